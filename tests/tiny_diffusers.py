"""Tiny random diffusers/transformers Stable Diffusion pipelines, saved in the real layout.

They are the numerical oracles of the parity tests: PyTorch models with every parameter drawn at
random (so zero-initialised layers hide nothing), written by `save_pretrained`, read by medjax.
"""
import os
from pathlib import Path

import numpy as np

from medjax import tokenizer as tokenizer_lib

STYLES = ("sd1", "sd2")


def clip_bpe_path() -> Path:
  """The real CLIP BPE vocabulary that the open_clip_torch wheel ships (never imported)."""
  path = tokenizer_lib.find_clip_bpe()
  if path is None:
    raise RuntimeError("open_clip_torch is needed for the CLIP vocabulary: "
                       "pip install --no-deps open_clip_torch")
  return path


def randomize_(module, seed: int, scale: float = 0.1):
  """Draws every parameter at random; norm scales around 1 so activations stay in range."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      is_norm_scale = ("norm" in name and name.endswith("weight") and p.ndim == 1)
      p.copy_(1.0 + noise if is_norm_scale else noise)
  return module


def configs(style: str) -> dict:
  """Component configs of a tiny SD1-style or SD2-style pipeline."""
  assert style in STYLES
  sd2 = style == "sd2"
  unet = dict(
      sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
      block_out_channels=(32, 64), norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=48 if sd2 else 32,
      attention_head_dim=(2, 4) if sd2 else 4,
      use_linear_projection=sd2, upcast_attention=sd2,
      flip_sin_to_cos=True, freq_shift=0)
  vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
      block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64,
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
  text = dict(
      vocab_size=49408, hidden_size=48 if sd2 else 32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
      hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=1 if sd2 else 49407)
  scheduler = dict(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
      prediction_type="v_prediction" if sd2 else "epsilon")
  return dict(unet=unet, vae=vae, text_encoder=text, scheduler=scheduler)


def make_pipeline_dir(out_dir, style: str = "sd1", seed: int = 0, safe_serialization=True):
  """Saves a tiny random `StableDiffusionPipeline` to `out_dir`; returns the pipeline."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,  # pylint: disable=g-import-not-at-top
                         UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # pylint: disable=g-import-not-at-top

  out_dir = Path(out_dir)
  cfg = configs(style)
  torch.manual_seed(seed)
  unet = randomize_(UNet2DConditionModel(**cfg["unet"]), seed)
  vae = randomize_(AutoencoderKL(**cfg["vae"]), seed + 1)
  text = randomize_(CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])), seed + 2)
  tok_dir = out_dir.with_name(out_dir.name + "_tokenizer")
  if not tok_dir.exists():
    tokenizer_lib.write_clip_tokenizer_from_bpe(
        clip_bpe_path(), tok_dir, pad_token="!" if style == "sd2" else "<|endoftext|>")
  tok = CLIPTokenizer.from_pretrained(tok_dir)
  pipe = StableDiffusionPipeline(
      vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
      scheduler=PNDMScheduler(**cfg["scheduler"]), safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.save_pretrained(out_dir, safe_serialization=safe_serialization)
  return pipe


def state_dict_numpy(module) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_threads():
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(min(2, os.cpu_count() or 1))
