"""Generated images written to a folder as PNGs marked synthetic, plus a grid.

Image i uses seed + i, so the images do not depend on the batch size. Images stream to disk
batch by batch: memory stays flat in the number of images, and the grid shows the first
`GRID_MAX` of them. An embedding interpolation is written as its images plus one strip.
Used by `python -m medjax.sample`.
"""
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tqdm

from medjax import schedulers
from medjax import tokenizer as tokenizer_lib
from medjax import workdir
from medjax.errors import MedjaxError
from medjax.images import grid
from medjax.images import save_png
from medjax.images import to_uint8
from medjax.sampling import default_size
from medjax.sampling import interpolation_row
from medjax.sampling import parse_prompt

# The grid holds at most this many images (the first ones), so it stays a viewable picture
# and memory does not grow with the number of images.
GRID_MAX = 64
# A generated PNG rarely compresses below a quarter of its raw RGB bytes: a low estimate of
# its size, so the disk check refuses only runs that cannot fit.
PNG_BYTES_PER_PIXEL = 3 / 4
MAX_SEED = 2 ** 32 - 1
# A textual-inversion placeholder as prompts write it: `<name>`.
_PLACEHOLDER = re.compile(r"<[^<>\s]+>")


def check_args(*, num_images, batch_size, steps, scheduler, height, width, outdir,
               guidance: float = 7.5, seed: int = 0, overwrite: bool = False) -> None:
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
  if not math.isfinite(guidance) or guidance < 0:
    raise MedjaxError(f"--guidance = {guidance}; expected a finite number >= 0")
  if seed < 0 or seed + num_images - 1 > MAX_SEED:
    raise MedjaxError(f"--seed = {seed}; image i uses seed + i, so expected 0 <= seed and "
                      f"seed + num_images - 1 <= {MAX_SEED}")
  if not outdir:
    raise MedjaxError("--outdir is required")
  check_outdir(outdir, overwrite=overwrite)


def check_outdir(outdir, *, overwrite: bool = False) -> None:
  """`outdir` is a folder where a file can be written, or can be made (`medjax.workdir`; nothing
  is created here), and holds no earlier generated images unless `overwrite` (a rerun must not
  silently replace images already shared or evaluated)."""
  path = Path(workdir.check_dir(outdir, "--outdir"))
  if path.is_dir() and not overwrite:
    earlier = sorted(p.name for p in path.glob("sample_*.png"))[:1] + [
        name for name in ("grid.png", "strip.png") if (path / name).exists()]
    if earlier:
      raise MedjaxError(f"--outdir={outdir}: already holds generated images ({earlier[0]}, ...); "
                        "pass --overwrite to replace them, or choose another folder")


def check_disk_space(outdir, num_images: int, height: int, width: int) -> None:
  """Refuses up front a run whose PNGs cannot fit in the free space of `outdir`'s disk."""
  existing = Path(outdir).absolute()
  while not existing.exists():
    existing = existing.parent
  need = num_images * height * width * PNG_BYTES_PER_PIXEL
  free = shutil.disk_usage(existing).free
  if need > free:
    raise MedjaxError(f"--num_images = {num_images}: {num_images} PNGs of {height}x{width} need "
                      f"at least ~{need / 1e9:.3g} GB, but {existing} has {free / 1e9:.3g} GB "
                      "free")


def check_placeholders(sd, text: str, flag: str) -> None:
  """Every `<token>` in a prompt is a token of the model (else CLIP would split it into pieces
  and silently generate without the learned concept)."""
  vocab = tokenizer_lib.base_tokenizer(sd.tokenizer).get_vocab()
  for part, _ in parse_prompt(text):
    for token in _PLACEHOLDER.findall(part):
      if token not in vocab:
        raise MedjaxError(f"{flag}: {token!r} is not a token of {sd.name}; load its "
                          "textual-inversion embedding with --embeddings=FILE")


class WrittenFiles(Sequence):
  """The paths `sample_to_dir` wrote: sample_0000.png ... in order, then grid.png.

  Computed on demand, so a run of millions of images holds no list of paths.
  """

  def __init__(self, outdir: Path, count: int):
    self.outdir, self.count = Path(outdir), count

  def __len__(self) -> int:
    return self.count + 1

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.outdir / ("grid.png" if i == self.count else f"sample_{i:04d}.png")


def sample_to_dir(sd, outdir, *, prompt: str, negative_prompt: str = "", num_images: int = 4,
                  batch_size: int = 4, steps: int = 50, guidance: float = 7.5,
                  scheduler: str = "ddim", seed: int = 0, height: int = 0,
                  width: int = 0, extra_metadata: dict | None = None,
                  overwrite: bool = False, image: np.ndarray | None = None,
                  mask: np.ndarray | None = None, strength: float = 1.0) -> WrittenFiles:
  """Generates `num_images` and writes them with a grid of the first `GRID_MAX`; returns the
  paths written (the grid last). `image`, `mask`, `strength`: img2img / inpainting, as
  `sampling.generate` (the image at the output size)."""
  check_args(num_images=num_images, batch_size=batch_size, steps=steps, scheduler=scheduler,
             height=height, width=width, outdir=outdir, guidance=guidance, seed=seed,
             overwrite=overwrite)
  check_placeholders(sd, prompt, "--prompt")
  check_placeholders(sd, negative_prompt, "--negative_prompt")
  default = default_size(sd)
  check_disk_space(outdir, num_images, height or default[0], width or default[1])
  outdir = Path(outdir)
  meta = {"synthetic": "true", "generator": "medjax", "prompt": prompt,
          "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
          "scheduler": scheduler, "model": sd.name, **(extra_metadata or {})}
  kept = []  # the grid's images: at most GRID_MAX
  for start in tqdm.trange(0, num_images, batch_size, desc="batches", unit="batch"):
    seeds = list(range(seed + start, seed + min(start + batch_size, num_images)))
    images = sd.generate([prompt] * len(seeds), negative_prompt, num_inference_steps=steps,
                         guidance_scale=guidance, scheduler=scheduler, height=height or None,
                         width=width or None, seed=seeds, image=image, mask=mask,
                         strength=strength)
    outdir.mkdir(parents=True, exist_ok=True)  # only once the first batch has passed the checks
    for s, img in zip(seeds, to_uint8(images), strict=True):
      save_png(img, outdir / f"sample_{s - seed:04d}.png", {**meta, "seed": s})
      if len(kept) < GRID_MAX:
        kept.append(img)
  written = WrittenFiles(outdir, num_images)
  save_png(grid(np.stack(kept)), written[-1],
           {**meta, "seed": f"{seed}..{seed + len(kept) - 1}",
            "grid": f"the first {len(kept)} of {num_images} images"})
  return written


def interpolation_to_dir(sd, outdir, *, prompt: str, prompt_b: str, weights: Sequence[float],
                         negative_prompt: str = "", batch_size: int = 4, steps: int = 50,
                         guidance: float = 7.5, scheduler: str = "ddim", seed: int = 0,
                         height: int = 0, width: int = 0, extra_metadata: dict | None = None,
                         overwrite: bool = False) -> list[Path]:
  """Image i from the text-encoder outputs (1 - w_i) E(prompt) + w_i E(prompt_b), every image
  from `seed`'s noise (`sampling.interpolation_row`); writes sample_NNNN.png and strip.png (the
  images side by side) and returns their paths (the strip last).

  The conditioning, not the prompt text or token embeddings, is interpolated: w = 0 and 1 give
  the plain prompts' images, and the guidance's unconditional pass is the negative prompt's.
  """
  check_args(num_images=1, batch_size=batch_size, steps=steps, scheduler=scheduler,
             height=height, width=width, outdir=outdir, guidance=guidance, seed=seed,
             overwrite=overwrite)
  check_placeholders(sd, prompt, "--prompt")
  check_placeholders(sd, prompt_b, "--interpolate")
  check_placeholders(sd, negative_prompt, "--negative_prompt")
  default = default_size(sd)
  check_disk_space(outdir, 2 * len(weights), height or default[0], width or default[1])
  outdir = Path(outdir)
  meta = {"synthetic": "true", "generator": "medjax", "prompt": prompt, "prompt_b": prompt_b,
          "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
          "scheduler": scheduler, "model": sd.name, "seed": seed,
          "interpolated": "text-encoder output (1 - w) * prompt + w * prompt_b",
          **(extra_metadata or {})}
  paths, kept = [], []
  for start in range(0, len(weights), batch_size):
    chunk = list(weights[start:start + batch_size])
    images = interpolation_row(sd, prompt, prompt_b, chunk, seed=seed,
                               negative_prompts=negative_prompt, num_inference_steps=steps,
                               guidance_scale=guidance, scheduler=scheduler,
                               height=height or None, width=width or None)
    outdir.mkdir(parents=True, exist_ok=True)
    for i, (w, img) in enumerate(zip(chunk, to_uint8(images), strict=True), start):
      paths.append(outdir / f"sample_{i:04d}.png")
      save_png(img, paths[-1], {**meta, "interpolation_weight": f"{w:.6g}"})
      kept.append(img)
  paths.append(outdir / "strip.png")
  save_png(np.concatenate(kept, axis=1), paths[-1],
           {**meta, "interpolation_weights": ", ".join(f"{w:.6g}" for w in weights)})
  return paths
