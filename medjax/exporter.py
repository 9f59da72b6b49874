"""A medjax model as a diffusers directory PyTorch can load, written safely.

The directory is written to a temporary path and renamed when complete, then reloaded and
checked against the in-memory model, so an interrupted or faulty export never leaves a
directory that looks usable. `python -m medjax.export` is its command line.
"""
import shutil
from pathlib import Path

import jax
import numpy as np

from medjax import trainer
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion


def export(sd: StableDiffusion, out_dir, *, overwrite: bool = False, dtype="float32") -> float:
  """Writes `sd` to `out_dir` and returns the max abs difference of a reload's noise prediction."""
  out_dir = Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise MedjaxError(f"{out_dir}: already exists (pass --overwrite to replace it)")
  staging = out_dir.with_name(f".{out_dir.name}.new")
  if staging.exists():
    shutil.rmtree(staging)
  sd.save_pretrained(staging, dtype=np.dtype(jax.numpy.dtype(dtype)))
  error = verify_reload(sd, staging)
  if out_dir.exists():
    shutil.rmtree(out_dir)
  staging.rename(out_dir)
  return error


def verify_reload(sd: StableDiffusion, path) -> float:
  """Reloads `path` and compares a full forward (prompt -> U-Net -> VAE) with `sd`'s."""
  other = StableDiffusion.from_pretrained(path)
  size = int(sd.configs["unet"].get("sample_size", 8))
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, size, size, sd.latent_channels)).astype(np.float32)
  results = []
  for model in (sd, other):
    emb = model.encode_prompt(["a chest x-ray with pleural effusion"])
    eps = model.predict_noise(latents, np.array([500]), emb)
    img = model.decode_latents(eps)
    results.append(np.asarray(img, np.float32))
  return float(np.max(np.abs(results[0] - results[1])))


def is_training_workdir(path) -> bool:
  path = Path(path)
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def load_source(source: str, *, seed: int = 0, step: int | None = None,
                ema: bool = True) -> StableDiffusion:
  """A diffusers directory / single file, a training workdir, or '' (the embedded model)."""
  if source and is_training_workdir(source):
    return trainer.restore_pipeline(source, step=step, ema=ema)
  return StableDiffusion.load(source, **({} if source else {"seed": seed}))
