r"""Prostate MRI U-Net fine-tuning on PI-CAI slices, prompts from the slice's csPCa label.

  python -m medjax.train --config=configs/mri_unet.py --workdir=/tmp/mri_unet
      The embedded default: tiny random SD, prostate MRI phantoms, 64 px.
  python -m medjax.train --config=configs/mri_unet.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.source=picai --config.data.root=/path/to/picai \
      --config.data.picai.cache_dir=/path/to/cache
  Arg options: paper, prior (prior preservation with 'a prostate mri' class images).
"""
from medjax.train_config import base_config


def get_config(arg: str = ""):
  opts = set(filter(None, (arg or "").split(",")))
  c = base_config()
  c.objective = "unet"
  c.data.phantoms.kind = "mri"
  c.data.classes = "diseased: csPCa=1; healthy: csPCa=0"
  c.data.prompt.kind = "class"
  c.data.prompt.class_prompts = {
      "diseased": "a prostate mri with clinically significant prostate cancer",
      "healthy": "a prostate mri with no lesion"}
  c.sample.prompts = ("a prostate mri with clinically significant prostate cancer; "
                      "a prostate mri with no lesion")
  c.learning_rate = 1e-4
  if "paper" in opts:
    c.resolution = 512
    c.total_steps = 20_000
    c.batch_size = 32
    c.learning_rate = 5e-6
    c.warmup_steps = 500
    c.mixed_precision = "bf16"
    c.remat = True
    c.ema_decay = 0.9999
    c.cache_latents = True
    c.data.source = "picai"
    c.checkpoint_every_steps, c.log_every_steps, c.sample_every_steps = 1000, 50, 2000
  if "prior" in opts:
    c.prior.enabled = True
    c.prior.class_prompt = "a prostate mri"
    c.prior.num_class_images = 200 if "paper" in opts else 8
  return c
