"""Flax models: the Stable Diffusion U-Net, VAE and CLIP text encoder."""
from medjax.models.unet import UNet2DConditionModel
from medjax.models.vae import AutoencoderKL, latent_sample
from medjax.models.clip import CLIPTextModel
