"""Host batches for the train step: data rows -> prompt ids, images or cached VAE moments, prior
rows; built and put on the devices by a background thread while the previous step runs.

`run` below is a `trainer.Setup` (its `sd`, `mesh` and `frozen` params). Row layout: every
process holds block `shard[0]` of `shard[1]` of each global batch (`hosts.data_shard`), and the
prior rows of a step follow the same layout, so a global batch is the same on any process count.
"""
import dataclasses
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from medjax import hosts
from medjax import images as images_lib
from medjax import paths
from medjax import preemption
from medjax import sharding
from medjax.data import loader as data_loader
from medjax.data import read_image
from medjax.errors import MedjaxError
from medjax.images import rgb_in_unit_range
from medjax.pipeline import StableDiffusion

PREFETCH = 2  # device batches made ahead of the step that takes them
# After a SIGTERM, how long the loop still waits for a batch that is not there (a stuck or
# starved data pipeline) before it stops with an error instead of never reaching the save.
PREEMPTED_WAIT_S = 30.0
_POLL_S = 0.5


def vae_moments(sd: StableDiffusion, vae_params, images) -> jax.Array:
  """Images [-1, 1] NHWC -> the VAE posterior's (mean, logvar) concatenated on channels."""
  mean, logvar = sd.vae.apply({"params": vae_params}, images, method="encode")
  return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)


class LocalEncoder:
  """The frozen VAE encoder replicated on this process's devices: encodes this process's images
  without any collective, so processes may encode different numbers of images at different
  steps (latent-cache misses) without waiting for each other. Built on all processes at once.
  """

  def __init__(self, run: Any):
    vae = run.frozen["vae"]
    params = hosts.to_host({k: v for k, v in vae.items()
                            if k not in ("decoder", "post_quant_conv")})
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("rows",))
    self._rows = NamedSharding(mesh, P("rows"))
    self._n = len(devices)
    self._params = jax.device_put(params, NamedSharding(mesh, P()))
    sd = run.sd
    self._fn = jax.jit(lambda p, x: vae_moments(sd, p, x), out_shardings=self._rows)

  def __call__(self, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """[N, H, W, 3] in [-1, 1] -> [N, h, w, 2C] moments (explicit device_get: host values)."""
    out = []
    step = max(self._n, chunk // self._n * self._n)
    for i in range(0, len(images), step):
      x = np.asarray(images[i:i + step], np.float32)
      pad = -len(x) % self._n
      if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
      y = jax.device_get(self._fn(self._params, jax.device_put(x, self._rows)))
      out.append(np.asarray(y)[:len(x) - pad])
    return np.concatenate(out)


class LatentCache:
  """VAE moments per record key, so each image is encoded once (deterministic pipelines only)."""

  def __init__(self):
    self.table: dict[str, np.ndarray] = {}

  def moments(self, encoder: LocalEncoder, keys, images: np.ndarray) -> np.ndarray:
    missing = [i for i, k in enumerate(keys) if k not in self.table]
    if missing:
      out = encoder(images[missing])
      for j, i in enumerate(missing):
        self.table[keys[i]] = out[j]
    return np.stack([self.table[k] for k in keys])


@dataclasses.dataclass
class PriorImages:
  """Class images for prior preservation: their moments and prompt ids, cycled by step."""
  moments: np.ndarray
  input_ids: np.ndarray

  def rows(self, step: int, n: int, shard: tuple[int, int] = (0, 1)
           ) -> tuple[np.ndarray, np.ndarray]:
    """This process's `n` rows of step `step`'s global prior batch (`n * shard[1]` rows)."""
    index, count = shard
    idx = (step * n * count + index * n + np.arange(n)) % len(self.moments)
    return self.moments[idx], self.input_ids[idx]


def uncond_setting(config: Any) -> tuple[float, int]:
  """(config.unet.uncond_prob, config.seed), checked: what `host_rows` takes as `uncond`."""
  p = config.unet.uncond_prob
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
    raise MedjaxError(f"config.unet.uncond_prob={p!r}: expected a share in [0, 1)")
  return float(p), int(config.seed)


def drop_prompts(prompts, probability: float, *, seed: int, step: int,
                 shard: tuple[int, int]) -> list[str]:
  """Classifier-free guidance training: a seeded share of the prompts becomes '' (the empty
  prompt that guidance contrasts with at sampling); a resumed run drops the same rows."""
  if probability <= 0:
    return list(prompts)
  drop = np.random.default_rng([seed, step, shard[0]]).random(len(prompts)) < probability
  return ["" if d else str(p) for p, d in zip(prompts, drop, strict=True)]


def host_rows(run: Any, batch: dict, *, step: int, cache: LatentCache | None,
              prior: PriorImages | None, encoder: LocalEncoder | None = None,
              shard: tuple[int, int] = (0, 1), uncond: tuple[float, int] = (0.0, 0)) -> dict:
  """A data batch (this process's rows) -> the NumPy arrays the jitted step takes.

  Images go to the step, which encodes them (no host round trip), unless the latent cache
  holds their moments; prior rows travel separately and the step appends them to the batch.
  The VAE objective takes the images only (no prompt ids). `uncond`: (probability, seed) of
  `drop_prompts`.
  """
  out = {}
  if run.trainable.kind != "vae":
    prompts = drop_prompts(batch["prompt"], uncond[0], seed=uncond[1], step=step, shard=shard)
    out["input_ids"] = run.sd.tokenize(prompts)
  if cache is not None:
    out["moments"] = cache.moments(encoder, list(batch["key"]), batch["image"])
  else:
    out["image"] = batch["image"]
  if prior is not None:
    out["prior_moments"], out["prior_input_ids"] = prior.rows(step, len(batch["image"]), shard)
  return out


def host_batch(run: Any, batch: dict, *, step: int, cache: LatentCache | None,
               prior: PriorImages | None, encoder: LocalEncoder | None = None,
               shard: tuple[int, int] = (0, 1), uncond: tuple[float, int] = (0.0, 0)) -> dict:
  """`host_rows`, sharded over the mesh (global arrays)."""
  return sharding.shard_batch(host_rows(run, batch, step=step, cache=cache, prior=prior,
                                        encoder=encoder, shard=shard, uncond=uncond), run.mesh)


class Prefetcher:
  """Device batches made by a background thread, `depth` ahead of the step that takes them.

  The thread does only process-local work (reading, tokenizing, local encoding, device_put),
  never a collective, so the processes' collectives stay in the same order. `state` is the data
  iterator's state after the batches taken so far (not those made ahead): what a checkpoint
  saves, so a resumed run continues exactly after the last step done.

  Waiting for a batch wakes up for a SIGTERM: the main thread would otherwise sit here, unable
  to save, for as long as the data pipeline gives nothing.
  """

  def __init__(self, data, make: Callable[[dict, int], dict], first_step: int,
               depth: int = PREFETCH, preempted_wait_s: float = PREEMPTED_WAIT_S):
    self.state = data.get_state()
    self._data, self._make, self._step = data, make, first_step
    self._taken, self._preempted_wait_s = 0, preempted_wait_s
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="medjax-prefetch", daemon=True)

  def _run(self) -> None:
    step = self._step
    try:
      while not self._stop.is_set():
        rows = next(self._data)
        item = (self._make(rows, step), self._data.get_state(), None)
        step += 1
        self._put(item)
    except BaseException as e:  # pylint: disable=broad-except
      self._put((None, None, e))

  def _put(self, item) -> None:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def next(self) -> dict:
    if self._thread.ident is None:
      self._thread.start()  # on first use: a finished run reads nothing
    batch, state, error = self._get()
    if error is not None:
      self._stop.set()
      raise error
    self.state = state
    self._taken += 1
    return batch

  def _get(self):
    since = None  # when the wait first saw the SIGTERM
    while True:
      try:
        return self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        pass
      if not preemption.WATCH.requested:
        continue
      since = time.monotonic() if since is None else since
      if time.monotonic() - since >= self._preempted_wait_s:
        self._stop.set()
        raise MedjaxError(
            f"SIGTERM while waiting for training data: no batch for step "
            f"{self._step + self._taken + 1} within {self._preempted_wait_s:g} s (the data "
            "pipeline is stuck or too slow), so nothing newer than the last checkpoint was "
            "saved; rerun the same command to resume from it")

  def close(self) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=10)


# -- prior-preservation class images ---------------------------------------------------------------

def _image_files(folder) -> list:
  if not folder.exists():
    return []
  return sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _read_rgb(path) -> np.ndarray:
  """[H, W, 3] in [0, 1]; URLs (gs://) are read through epath."""
  if not paths.is_url(path):
    return rgb_in_unit_range(read_image(os.fspath(path)))
  with path.open("rb") as f, Image.open(f) as image:
    return rgb_in_unit_range(np.asarray(image.convert("RGB"), np.float32) / 255.0)


def _write_class_images(images: np.ndarray, folder, workdir, meta: dict, seed: int) -> None:
  """Process 0: the PNGs into `folder`, replacing it whole. Local folders appear at once (a
  rename); in a URL folder each file appears complete, and a short folder is made again."""
  local = not paths.is_url(folder)
  target = workdir / ".class_images.tmp" if local else folder
  if local and target.exists():
    shutil.rmtree(target)
  elif not local and folder.exists():
    folder.rmtree()
  for i, img in enumerate(images):
    images_lib.save_png(img, target / f"sample_{i:04d}.png", {**meta, "seed": seed + i})
  if local:
    if folder.exists():  # too few images (some deleted): the new set replaces them whole
      shutil.rmtree(folder)
    os.replace(target, folder)
  logging.info("wrote %d class images to %s", len(images), folder)


def make_prior_images(config: Any, run: Any, generator: Callable[[], StableDiffusion],
                      workdir, encoder: LocalEncoder) -> PriorImages:
  """Reads the given class images, or generates them with `generator()` (the model as the run
  starts; once, into the workdir: a resumed run finds them there), and encodes them.

  All processes generate together (the model is sharded over all of them); process 0 writes
  the files, and everyone reads them once it has (a barrier).
  """
  p = config.prior
  folder = (paths.workdir_path(p.class_images_dir) if p.class_images_dir
            else workdir / "class_images")
  files = _image_files(folder)
  if not p.class_images_dir and hosts.agree(len(files) < p.num_class_images):
    logging.info("prior preservation: generating %d class images of %r", p.num_class_images,
                 p.class_prompt)
    sd, batch, made = generator(), min(p.num_class_images, 8), []
    for start in range(0, p.num_class_images, batch):
      seeds = list(range(config.seed + start,
                         config.seed + min(start + batch, p.num_class_images)))
      made.append(images_lib.to_uint8(sd.generate(
          [p.class_prompt] * len(seeds), "", num_inference_steps=p.num_inference_steps,
          guidance_scale=p.guidance_scale, scheduler="ddim", height=config.resolution,
          width=config.resolution, seed=seeds)))
    if hosts.is_lead():
      meta = {"synthetic": "true", "generator": "medjax", "prompt": p.class_prompt,
              "negative_prompt": "", "steps": p.num_inference_steps,
              "guidance": p.guidance_scale, "scheduler": "ddim", "model": sd.name}
      _write_class_images(np.concatenate(made), folder, workdir, meta, config.seed)
    hosts.sync("medjax:class_images")
    files = _image_files(folder)
  if not files:
    raise MedjaxError(f"config.prior.class_images_dir={str(folder)!r}: no PNG/JPEG images")
  images = np.stack([data_loader.resize_to(_read_rgb(f), config.resolution)
                     for f in files]) * 2 - 1
  ids = run.sd.tokenize([p.class_prompt] * len(files))
  return PriorImages(encoder(images), ids)
