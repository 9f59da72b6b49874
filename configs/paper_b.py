r"""Paper B's table in one command: the base model, U-Net fine-tuning without and with the prior.

  python -m medjax.reproduce --config=configs/paper_b.py --workdir=/tmp/paper_b
      The embedded default (tiny model, CXR phantoms): minutes on a CPU.
  python -m medjax.reproduce --config=configs/paper_b.py:paper --workdir=/runs/paper_b \
      --config.model.pretrained=/path/to/stable-diffusion-v1-4 \
      --config.data.root=/path/to/CheXpert-v1.0-small \
      --config.fid.weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.fid.allow_pickle=True
      Stages: evaluate_base (the VAE table at 512 px and a DenseNet-121 trained on real images
      scoring the base model's generations), finetune (configs/cxr_unet.py:paper),
      evaluate_finetune, finetune_prior (cxr_unet.py:paper,prior: DreamBooth prior
      preservation), evaluate_finetune_prior (paper: ~0.98 AUC, ~95% accuracy on pleural
      effusion for their best fine-tuned U-Net).
  Writes DIR/split.json, DIR/<stage>/ per stage, DIR/results.md and results.json.
  Arg options: paper.
"""
from medjax import paper_tables
from medjax.config_args import ArgSpec

ARG = ArgSpec(flags=("paper",))


def get_config(arg: str = ""):
  return paper_tables.paper_b(ARG.parse(arg, __file__).paper)
