"""Flax models: the Stable Diffusion U-Net, VAE and CLIP text encoder."""
from medjax.models.clip import CLIPTextModel
from medjax.models.unet import UNet2DConditionModel
from medjax.models.vae import AutoencoderKL
from medjax.models.vae import latent_sample

__all__ = ["AutoencoderKL", "CLIPTextModel", "UNet2DConditionModel", "latent_sample"]
