"""The random diffusers pipelines the benchmarks read (both sides read the same weights).

`write_pipeline(config, dir)`: 'tiny' is medjax's embedded model; 'mid' the mid U-Net of
benchmarks/unet.py with a 4-layer 768-wide CLIP and the tests' tiny VAE at 256^2; 'sd15' SD1.5's
U-Net, VAE and CLIP sizes at 512^2 (4.1 GB of fp32 safetensors). `ensure` writes one once, so
train_step.py and sample.py can share it (`--pipeline_dir`).
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

RESOLUTION = {"tiny": 64, "mid": 256, "sd15": 512}


def write_pipeline(config: str, out_dir: str) -> None:
  """The random diffusers directory both sides read (the embedded tiny model, or mid/sd15)."""
  if config == "tiny":
    from medjax import StableDiffusion  # pylint: disable=g-import-not-at-top
    StableDiffusion.embedded(0).save_pretrained(out_dir)
    return
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top

  from tests import tiny_diffusers  # pylint: disable=g-import-not-at-top
  pipe = tiny_diffusers.make_pipeline_dir(out_dir, style="sd1")
  shutil.rmtree(out_dir)
  torch.manual_seed(0)
  sd15 = config == "sd15"
  text = tiny_diffusers.configs("sd1")["text_encoder"]
  text.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12 if sd15 else 4, projection_dim=768)
  pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
  unet_cfg = unet_bench.unet_config(config)
  unet_cfg.update(sample_size=RESOLUTION[config] // 8)
  pipe.unet = UNet2DConditionModel(**unet_cfg).eval()
  if sd15:
    pipe.vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4).eval()
  pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae)
  pipe.save_pretrained(out_dir)


def ensure(config: str, path: str, write=None) -> None:
  """`write(config, dir)` (default `write_pipeline`) unless `path` already holds a pipeline;
  written beside it and renamed, so a killed writer leaves none."""
  if os.path.isfile(os.path.join(path, "model_index.json")):
    return
  tmp = f"{path.rstrip('/')}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  (write or write_pipeline)(config, tmp)
  shutil.rmtree(path, ignore_errors=True)
  os.rename(tmp, path)
