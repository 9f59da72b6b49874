"""Generated images written to a folder as PNGs marked synthetic, plus a grid.

Image i uses seed + i, so the images do not depend on the batch size. Used by
`python -m medjax.sample` and by training's prior preservation (its class images).
"""
from pathlib import Path

import numpy as np
import tqdm

from medjax import schedulers
from medjax.errors import MedjaxError
from medjax.images import grid
from medjax.images import save_png
from medjax.images import to_uint8


def check_args(*, num_images, batch_size, steps, scheduler, height, width, outdir) -> None:
  """Cheap checks before the model loads, so bad flags fail fast and write nothing."""
  for name, value in (("num_images", num_images), ("batch_size", batch_size), ("steps", steps)):
    if value <= 0:
      raise MedjaxError(f"--{name} = {value}; expected a positive integer")
  if scheduler not in schedulers.NAMES:
    raise MedjaxError(f"--scheduler = {scheduler!r}; expected one of "
                      f"{', '.join(schedulers.NAMES)}")
  for name, value in (("height", height), ("width", width)):
    if value < 0 or value % 8:
      raise MedjaxError(f"--{name} = {value}; expected 0 (default) or a positive multiple of 8")
  if not outdir:
    raise MedjaxError("--outdir is required")


def sample_to_dir(sd, outdir, *, prompt: str, negative_prompt: str = "", num_images: int = 4,
                  batch_size: int = 4, steps: int = 50, guidance: float = 7.5,
                  scheduler: str = "ddim", seed: int = 0, height: int = 0,
                  width: int = 0, extra_metadata: dict | None = None) -> list[Path]:
  """Generates `num_images` and writes them with a grid; returns the paths written."""
  check_args(num_images=num_images, batch_size=batch_size, steps=steps, scheduler=scheduler,
             height=height, width=width, outdir=outdir)
  outdir = Path(outdir)
  meta = {"synthetic": "true", "generator": "medjax", "prompt": prompt,
          "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
          "scheduler": scheduler, "model": sd.name, **(extra_metadata or {})}
  written, kept = [], []
  for start in tqdm.trange(0, num_images, batch_size, desc="batches", unit="batch"):
    seeds = list(range(seed + start, seed + min(start + batch_size, num_images)))
    images = sd.generate([prompt] * len(seeds), negative_prompt, num_inference_steps=steps,
                         guidance_scale=guidance, scheduler=scheduler, height=height or None,
                         width=width or None, seed=seeds)
    outdir.mkdir(parents=True, exist_ok=True)  # only once the first batch has passed the checks
    for s, img in zip(seeds, to_uint8(images), strict=True):
      path = outdir / f"sample_{s - seed:04d}.png"
      save_png(img, path, {**meta, "seed": s})
      written.append(path)
      kept.append(img)
  path = outdir / "grid.png"
  save_png(grid(np.stack(kept)), path, {**meta, "seed": f"{seed}..{seed + num_images - 1}"})
  return written + [path]
