r"""Prostate MRI VAE training on PI-CAI slices (T2W/ADC/HBV as RGB): L1 + 1e-6 KL, no GAN.

  python -m medjax.train --config=configs/mri_vae.py --workdir=/tmp/mri_vae
      The embedded default: the tiny VAE (8x8x4 latents at 64 px) trained from its random
      weights on prostate MRI phantoms, batch 8, lr 1e-3; a few minutes on a 2-core CPU.
      samples/step_NNNNNN.png: held-out originals beside their reconstructions, with PSNR/SSIM
      in samples/step_NNNNNN.json.
  python -m medjax.train --config=configs/mri_vae.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.source=picai --config.data.root=/path/to/picai \
      --config.data.picai.cache_dir=/path/to/cache
      Fine-tunes SD's VAE decoder at 512 px on PI-CAI slices (the settings are ours,
      `medjax.train_config.vae_paper_scale`).
  python -m medjax.export --from=<workdir> --to=DIR
      A diffusers directory with the new VAE (U-Net and text encoder as they were).
  Arg options: paper, full (also train the encoder: the U-Net's latents then move).
"""
from medjax.config_args import ArgSpec
from medjax.train_config import base_config
from medjax.train_config import vae_recipe

ARG = ArgSpec(flags=("paper", "full"))


def get_config(arg: str = ""):
  opts = ARG.parse(arg, __file__)
  c = base_config()
  c.data.phantoms.kind = "mri"
  c.data.classes = (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
  c.data.prompt.kind = "class"
  c.data.prompt.class_prompts = {"diseased": "a prostate mri with clinically significant "
                                 "prostate cancer", "healthy": "a prostate mri with no lesion"}
  return vae_recipe(c, "picai", paper=opts.paper, full=opts.full)
