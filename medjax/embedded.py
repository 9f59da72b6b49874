"""The embedded default: a tiny Stable Diffusion that medjax trained on its own phantoms.

With no pretrained weights given, every medjax command runs on this model, so a fresh 2-core CPU
machine can exercise the whole toolkit in minutes. It has SD's structure (a VAE that downsamples
8x, a cross-attention U-Net, a causal CLIP text encoder, a real CLIP BPE tokenizer with a small
vocabulary) at 1.2M parameters. The shipped weights (`WEIGHTS`, 4.6 MB) come from
`configs/embedded_pretrain.py` (`medjax.embedded_recipe`): they draw chest X-ray and prostate
MRI phantoms of the prompted class. `pretrained=False` gives the same model with seeded random
weights (tests that need a model of no particular skill, or several different ones).
"""
import copy
import dataclasses
from pathlib import Path
from typing import Any

from medjax import tokenizer as tokenizer_lib

TINY_TOKENIZER_VERSION = 1  # bump when write_tiny_clip_tokenizer changes
TINY_RESOLUTION = 64  # pixels; latents are 8 x 8 x 4
WEIGHTS = Path(__file__).resolve().parent / "weights" / "embedded_tiny_sd.safetensors"
PRETRAINED_NAME = "embedded-tiny"
# The shipped file's metadata: how it was made and what it measured.
META_RECIPE, META_COMMIT, META_FIGURES = "medjax_recipe", "medjax_git_commit", "medjax_acceptance"
# What the phantom-trained model was taught to draw (configs/embedded_pretrain.py).
CLASS_PROMPTS = {
    "pleural_effusion": "a chest x-ray with pleural effusion",
    "no_finding": "a chest x-ray with no finding",
    "diseased": "a prostate mri with clinically significant prostate cancer",
    "healthy": "a prostate mri with no lesion",
}

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": TINY_RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": False,
}

TINY_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "sample_size": TINY_RESOLUTION,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

TINY_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,  # overwritten with the tiny tokenizer's ids below
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "vocab_size": 1000,
}

# Stable Diffusion 1.x's scheduler config (PNDM with its training betas).
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "clip_sample": False,
}


def tiny_configs(tokenizer) -> dict:
  """The tiny model's component configs, with the text encoder sized to the tokenizer."""
  text = copy.deepcopy(TINY_TEXT_ENCODER_CONFIG)
  text["bos_token_id"] = tokenizer.bos_token_id
  text["eos_token_id"] = tokenizer.eos_token_id
  text["pad_token_id"] = tokenizer.pad_token_id
  if len(tokenizer) > text["vocab_size"]:
    raise AssertionError(f"tiny tokenizer has {len(tokenizer)} tokens > vocab_size")
  return {"unet": copy.deepcopy(TINY_UNET_CONFIG), "vae": copy.deepcopy(TINY_VAE_CONFIG),
          "text_encoder": text}


def tiny_tokenizer_dir() -> Path:
  """The tiny CLIP tokenizer's folder, written once per machine (and tokenizer version)."""
  return tokenizer_lib.cached_tokenizer_dir(f"tiny-tokenizer-v{TINY_TOKENIZER_VERSION}",
                                            tokenizer_lib.write_tiny_clip_tokenizer)


@dataclasses.dataclass(frozen=True)
class TinyParts:
  """What `StableDiffusion.embedded` builds the tiny model from (modules and params it makes)."""
  tokenizer: Any
  tokenizer_dir: Path
  configs: dict  # component -> config dict
  scheduler_config: dict
  name: str
  param_seeds: dict  # component -> the seed its random params are drawn from


def tiny_parts(seed: int = 0, tokenizer_dir=None) -> TinyParts:
  """The tiny model's tokenizer, configs and per-component param seeds for `seed`."""
  tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else tiny_tokenizer_dir()
  tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
  configs = tiny_configs(tok)
  return TinyParts(tokenizer=tok, tokenizer_dir=tokenizer_dir, configs=configs,
                   scheduler_config=copy.deepcopy(SD_SCHEDULER_CONFIG),
                   name=f"embedded-tiny-seed{seed}",
                   param_seeds={name: seed * 1000 + i for i, name in enumerate(configs)})
