r"""Paper A's prostate MRI protocol: ResNet-18 on N real vs N real + M synthetic vs synthetic only.

  python -m medjax.evaluate --config=configs/eval_paper_a_mri.py --workdir=/tmp/eval_a_mri
      The embedded default: the tiny phantom-trained SD, MRI phantoms, small sizes (minutes on a
      CPU).
  python -m medjax.evaluate --config=configs/eval_paper_a_mri.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.model.embeddings='("/runs/mri_ti/embeddings/diffusers/cspca.safetensors",
          "/runs/mri_ti/embeddings/diffusers/healthy-prostate.safetensors")' \
      --config.data.root=/path/to/picai --config.data.picai.cache_dir=/path/to/cache \
      --config.fid.weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
      --config.fid.allow_pickle=True
      The protocol: 200/200/200 real slices (train/val/test), 2,000 synthetic (1,000 per class,
      from the learned tokens), ResNet-18, lr 1e-4, batch 32, 6,250 steps, 196 x 196 input,
      5 repeats (paper: real 0.780 +- 0.017, real+synthetic 0.803 +- 0.009, synthetic 0.766).
  Arg options: paper (the protocol at the papers' scale).
"""
from medjax.config_args import ArgSpec
from medjax.eval.protocols import paper_scale
from medjax.eval.protocols import protocol_config

ARG = ArgSpec(flags=("paper",))


def get_config(arg: str = ""):
  if ARG.parse(arg, __file__).paper:  # the tokens learned by configs/mri_ti.py
    return paper_scale(protocol_config("paper_a", "mri", {
        "diseased": "a prostate mri with <cspca>",
        "healthy": "a prostate mri with <healthy-prostate>"}), "picai")
  return protocol_config("paper_a", "mri", {
      "diseased": "a prostate mri with clinically significant prostate cancer",
      "healthy": "a prostate mri with no lesion"})
