r"""Chest X-ray VAE training (the autoencoder of latent diffusion: L1 + 1e-6 KL, no GAN).

  python -m medjax.train --config=configs/cxr_vae.py --workdir=/tmp/cxr_vae
      The embedded default: the tiny VAE (8x8x4 latents at 64 px) trained from its random
      weights on chest X-ray phantoms, batch 8, lr 1e-3; a few minutes on a 2-core CPU.
      samples/step_NNNNNN.png: held-out originals beside their reconstructions, with PSNR/SSIM
      in samples/step_NNNNNN.json.
  python -m medjax.train --config=configs/cxr_vae.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-v1-4 \
      --config.data.source=chexpert --config.data.root=/path/to/CheXpert-v1.0
      Fine-tunes SD's VAE decoder at 512 px on frontal CheXpert images (paper B's model and
      data; the fine-tuning settings are ours, `medjax.train_config.vae_paper_scale`).
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
  c.data.phantoms.kind = "cxr"
  c.data.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                   ("no_finding", {"No Finding": 1}))
  return vae_recipe(c, "chexpert", paper=opts.paper, full=opts.full)
