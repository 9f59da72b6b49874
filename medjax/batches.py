"""Host batches for the train step: data rows -> (cached) VAE moments, prompt ids, prior rows.

`run` below is a `trainer.Setup` (its `sd`, `mesh`, `frozen` params and jitted `encode`).
"""
import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from medjax import sample_files
from medjax import sharding
from medjax.data import loader as data_loader
from medjax.data import read_image
from medjax.errors import MedjaxError
from medjax.images import rgb_in_unit_range
from medjax.pipeline import StableDiffusion


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = {}
  for s in array.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def encode_rows(run: Any, images: np.ndarray) -> np.ndarray:
  """This process's images [-1, 1] -> their VAE moments, encoded sharded over the mesh."""
  return local_rows(run.encode(run.frozen["vae"],
                               sharding.shard_batch({"x": images}, run.mesh)["x"]))


class LatentCache:
  """VAE moments per record key, so each image is encoded once (deterministic pipelines only)."""

  def __init__(self):
    self.table: dict[str, np.ndarray] = {}

  def moments(self, run: Any, keys, images: np.ndarray) -> np.ndarray:
    missing = [i for i, k in enumerate(keys) if k not in self.table]
    if missing:
      out = encode_rows(run, images)
      for i in missing:
        self.table[keys[i]] = out[i]
    return np.stack([self.table[k] for k in keys])


@dataclasses.dataclass
class PriorImages:
  """Class images for prior preservation: their moments and prompt ids, cycled by step."""
  moments: np.ndarray
  input_ids: np.ndarray

  def rows(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = (step * n + np.arange(n)) % len(self.moments)
    return self.moments[idx], self.input_ids[idx]


def host_batch(run: Any, batch: dict, *, step: int, cache: LatentCache | None,
               prior: PriorImages | None) -> dict:
  """A data batch (this process's rows) -> the arrays the jitted step takes, sharded."""
  ids = run.sd.tokenize(list(batch["prompt"]))
  out = {"input_ids": ids}
  if cache is None and prior is None:
    out["image"] = batch["image"]
  else:
    moments = (cache.moments(run, list(batch["key"]), batch["image"]) if cache is not None
               else encode_rows(run, batch["image"]))
    out["moments"] = moments
    if prior is not None:
      n = len(moments)
      pm, pids = prior.rows(step, n)
      out = {"moments": np.concatenate([moments, pm]), "input_ids": np.concatenate([ids, pids]),
             "prior": np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])}
  return sharding.shard_batch(out, run.mesh)


def make_prior_images(config: Any, run: Any, generator: Callable[[], StableDiffusion],
                      workdir: Path) -> PriorImages:
  """Reads the given class images, or generates them with `generator()` (the model as the run
  starts; once, into the workdir: a resumed run finds them there), and encodes them."""
  p = config.prior
  folder = Path(p.class_images_dir) if p.class_images_dir else workdir / "class_images"
  files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
  if not p.class_images_dir and len(files) < p.num_class_images and jax.process_index() == 0:
    logging.info("prior preservation: generating %d class images of %r", p.num_class_images,
                 p.class_prompt)
    tmp = workdir / ".class_images.tmp"
    sample_files.sample_to_dir(generator(), tmp, prompt=p.class_prompt,
                               num_images=p.num_class_images,
                               batch_size=min(p.num_class_images, 8),
                               steps=p.num_inference_steps, guidance=p.guidance_scale,
                               height=config.resolution, width=config.resolution, seed=config.seed)
    (tmp / "grid.png").unlink()
    if folder.exists():  # too few images (some deleted): the new set replaces them whole
      shutil.rmtree(folder)
    os.replace(tmp, folder)
    files = sorted(folder.glob("*.png"))
  if not files:
    raise MedjaxError(f"config.prior.class_images_dir={str(folder)!r}: no PNG/JPEG images")
  images = np.stack([data_loader.resize_to(rgb_in_unit_range(read_image(f)), config.resolution)
                     for f in files]) * 2 - 1
  moments = []
  n = sharding.data_parallel_size(run.mesh)
  for i in range(0, len(images), n):
    chunk = images[i:i + n]
    pad = n - len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
    moments.append(np.asarray(run.encode(run.frozen["vae"], chunk))[:n - pad])
  ids = run.sd.tokenize([p.class_prompt] * len(files))
  return PriorImages(np.concatenate(moments), ids)
