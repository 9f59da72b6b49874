r"""Paper A's prostate MRI table in one command: a textual inversion per class, then the AUCs.

  python -m medjax.reproduce --config=configs/paper_a_mri.py --workdir=/tmp/paper_a_mri
      The embedded default (tiny model, MRI phantoms): minutes on a CPU.
  python -m medjax.reproduce --config=configs/paper_a_mri.py:paper --workdir=/runs/paper_a_mri \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.root=/path/to/picai --config.data.picai.cache_dir=/path/to/cache \
      --config.fid.weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.fid.allow_pickle=True
      Paper scale: <cspca> and <healthy-prostate> (64 vectors, 100k steps each) on the 100
      slices per class of the 200/200/200 split, then 2,000 synthetic slices and 5 repeats of
      the ResNet-18 protocol (paper: real 0.780 +- 0.017, real+synthetic 0.803 +- 0.009,
      synthetic 0.766).
  Writes DIR/split.json, DIR/<stage>/ per stage, DIR/results.md and results.json.
  Arg options: paper, ablation=none | vectors (1, 8, 16, 64) | images (per class: 10, 50,
  100): paper A's ablations, gathered into DIR/ablation.md and ablation.png.
"""
from medjax import paper_tables

ARG = paper_tables.PAPER_A_ARG


def get_config(arg: str = ""):
  return paper_tables.paper_a_config("mri", arg, __file__)
