r"""Prostate MRI U-Net fine-tuning on PI-CAI slices, prompts from the slice's csPCa label.

  python -m medjax.train --config=configs/mri_unet.py --workdir=/tmp/mri_unet
      The embedded default: tiny phantom-trained SD, prostate MRI phantoms, 64 px.
  python -m medjax.train --config=configs/mri_unet.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.source=picai --config.data.root=/path/to/picai \
      --config.data.picai.cache_dir=/path/to/cache
  Arg options: paper, prior (prior preservation with 'a prostate mri' class images).
"""
from medjax.config_args import ArgSpec
from medjax.train_config import base_config
from medjax.train_config import prior_preservation
from medjax.train_config import unet_paper_scale

ARG = ArgSpec(flags=("paper", "prior"))


def get_config(arg: str = ""):
  opts = ARG.parse(arg, __file__)
  c = base_config()
  c.objective = "unet"
  c.data.phantoms.kind = "mri"
  c.data.classes = (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
  c.data.prompt.kind = "class"
  c.data.prompt.class_prompts = {
      "diseased": "a prostate mri with clinically significant prostate cancer",
      "healthy": "a prostate mri with no lesion"}
  c.sample.prompts = ("a prostate mri with clinically significant prostate cancer",
                      "a prostate mri with no lesion")
  c.learning_rate = 1e-4
  if opts.paper:
    unet_paper_scale(c, "picai")
  if opts.prior:
    prior_preservation(c, "a prostate mri", paper=opts.paper)
  return c
