"""The evaluation image sets as on-disk stores: real splits, generated images, reconstructions.

Each set goes batch by batch into a uint8 store (`medjax.eval.image_store`) under
workdir/stores, so the protocols' peak memory does not grow with a split's size. With several
processes, process 0 writes each store (the workdir is shared) and every process then reads
its batches from it; generation runs on every process over the mesh and process 0 keeps the
images. A complete store with the same fingerprint (data config, split and resolution; for
generations the model files and sampling settings) is reused, e.g. when a run is resumed.
"""
import atexit
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from medjax import embedded as embedded_lib
from medjax import hosts
from medjax import images as images_lib
from medjax import paths
from medjax import sharding
from medjax.data import make_dataset
from medjax.errors import MedjaxError
from medjax.eval import image_store
from medjax.eval import leakage
from medjax.eval import recon

# A split, the generated images or reconstructions: an on-disk store (or a view / chain of
# them) with `labels` [N] (class index), `class_names` and float batches in [-1, 1].
Split = image_store.ImageStore


def fingerprint(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


_TEMP_STORES: list[str] = []


def store_root(workdir) -> tuple[Path, bool]:
  """(folder of the stores, shared by all processes). A local workdir holds them (multi-process
  workdirs are shared); for a URL workdir or none, each process keeps its own in a temp folder
  that is removed at exit."""
  if workdir is not None and not paths.is_url(workdir):
    return Path(os.fspath(workdir)) / "stores", True
  if not _TEMP_STORES:
    _TEMP_STORES.append(tempfile.mkdtemp(prefix="medjax-eval-stores-"))
    atexit.register(shutil.rmtree, _TEMP_STORES[0], True)
  return Path(_TEMP_STORES[0]), False


def shared_store(workdir, name: str, fp: str, make: Callable[[Path], Any]
                 ) -> image_store.ImageStore:
  """The store `name`: reused when complete with fingerprint `fp`, else made by `make(path)`
  (on process 0 when the folder is shared, otherwise on each process), then opened by all."""
  root, shared = store_root(workdir)
  path = root / name
  found = image_store.open_store(path, fp) is not None
  if not (hosts.agree(found) if shared else found):
    if shared:
      hosts.lead_only(lambda: make(path))
      hosts.sync(f"medjax.evaluate: store {name} written")
    else:
      make(path)
  store = image_store.open_store(path, fp)
  if store is None:
    raise MedjaxError(f"image store {path} (written by process 0) is missing or incomplete on "
                      f"process {jax.process_index()}: multi-process workdirs must be shared")
  return store


def load_split(config: Any, split: str, workdir=None, resolution: int | None = None,
               name: str = "") -> Split:
  """One split's images, in order, in a store `name` under `workdir` (written once, in
  batches; default name: the split's)."""
  resolution = resolution or config.resolution
  fp = fingerprint("split", config.data.to_dict(), split, resolution, config.seed)

  def make(path):
    data = make_dataset(config.data, split, batch_size=8, seed=config.seed,
                        resolution=resolution, process_index=0, process_count=1,
                        num_epochs=1, shuffle=False, drop_remainder=False)
    with image_store.StoreWriter(path, tuple(data.class_names), fp) as writer:
      for batch in data:
        writer.add(np.asarray(batch["image"], np.float32), np.asarray(batch["label"]),
                   list(batch["key"]))
      if not writer.count:
        raise MedjaxError(f"config.data: the {split!r} split is empty")
      writer.close()

  return shared_store(workdir, f"{name or split}_{resolution}px", fp, make)


def streamed_store(workdir, name: str, fp: str, class_names, produce: Callable[[Callable], Any]
                   ) -> tuple[Any, image_store.ImageStore]:
  """(`produce(add)`, the store `name`): `produce` runs on every process (it may compute over
  the mesh) and calls `add(images, labels[, keys])` per batch; the writing process appends them
  to the store as they come, the others drop them."""
  root, shared = store_root(workdir)
  writer = None
  if hosts.is_lead() or not shared:
    writer = image_store.StoreWriter(root / name, tuple(class_names), fp)
  try:
    drop = lambda images, labels, keys=None: None
    result = produce(writer.add if writer is not None else drop)
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  if writer is not None:
    writer.close()
  return result, shared_store(workdir, name, fp, lambda path: None)


def reused_or_streamed(workdir, name: str, fp: str, class_names,
                       produce: Callable[[Callable], Any]) -> image_store.ImageStore:
  """The complete store `name` of fingerprint `fp` if there (every process agreeing), else
  `streamed_store`'s: for sets a model computes over the mesh (generations, VAE round trips)."""
  root, shared = store_root(workdir)
  found = image_store.open_store(root / name, fp) is not None
  if hosts.agree(found) if shared else found:
    logging.info("reusing the images in %s", root / name)
    return shared_store(workdir, name, fp, lambda path: None)
  return streamed_store(workdir, name, fp, class_names, produce)[1]


def vae_roundtrip(config: Any, sd, split: Split, workdir, mesh=None) -> Split:
  """`split` passed through `sd`'s VAE (posterior mean, decoded), as a store with its labels
  and keys: real images the generator never saw, smoothed as its decoder smooths everything it
  outputs (the privacy audit calibrates on them; `config.privacy.heldout_through_vae`)."""
  name = f"{split.path.name}_vae"
  fp = fingerprint("vae_roundtrip", _model_identity(config), split.fingerprint,
                   split.rows.tolist())
  labels, keys = split.labels, split.keys

  def produce(add):
    done = [0]

    def sink(decoded):
      start, stop = done[0], done[0] + len(decoded)
      add(decoded, labels[start:stop], keys[start:stop] if keys else None)
      done[0] = stop

    recon.vae_roundtrip(sd, split, batch_size=config.privacy.batch_size, mesh=mesh, sink=sink)

  return reused_or_streamed(workdir, name, fp, split.class_names, produce)


def class_prompts(config: Any, class_names) -> dict[str, str]:
  given = dict(config.generation.prompts)
  base = dict(config.data.prompt.class_prompts)
  out = {}
  for name in class_names:
    prompt = given.get(name) or base.get(name)
    if not prompt:
      raise MedjaxError(f"no prompt for class {name!r}: set config.generation.prompts.{name}")
    out[name] = prompt
  return out


def _model_identity(config: Any) -> list:
  """Names, sizes and times of the model files, so a changed checkpoint is not reused."""
  m = config.model
  out: list = [m.to_dict()]
  embedded = "" if m.pretrained or m.embedded_random else str(embedded_lib.WEIGHTS)
  for name in (m.train_workdir, m.pretrained, embedded, *m.embeddings):
    if not name or paths.is_url(name) or not os.path.exists(name):
      continue
    if os.path.isfile(name):
      st = os.stat(name)
      out.append((name, st.st_size, st.st_mtime_ns))
      continue
    for folder, _, files in sorted(os.walk(name))[:500]:
      for f in sorted(files):
        st = os.stat(os.path.join(folder, f))
        out.append((os.path.relpath(os.path.join(folder, f), name), st.st_size, st.st_mtime_ns))
  return out


def generate_per_class(config: Any, sd, class_names, workdir, mesh=None) -> Split:
  """`num_per_class` images per class prompt (seeded) into a store, plus a grid PNG per class.

  With `mesh`, each batch is split over its data axis (padded with extra seeds to a multiple of
  its size; an image depends only on its own seed, so the padding changes no image). Each batch
  goes to the store as it is made; a complete store of the same settings is reused.
  """
  g = config.generation
  per = 1 if mesh is None else mesh.shape[sharding.DATA]
  prompts = class_prompts(config, class_names)
  fp = fingerprint("generated", _model_identity(config), g.to_dict(), prompts, config.seed,
                   config.resolution, list(class_names))
  total = g.num_per_class * len(class_names)

  def batches():
    bar = tqdm.tqdm(total=total, desc="generate", unit="img",
                    disable=not (config.progress_bar and hosts.is_lead()))
    for k, name in enumerate(class_names):
      for start in range(0, g.num_per_class, g.batch_size):
        n = min(g.batch_size, g.num_per_class - start)
        padded = -(-n // per) * per
        seeds = [config.seed * 1_000_003 + k * 100_003 + start + i for i in range(padded)]
        out = sd.generate([prompts[name]] * padded, num_inference_steps=g.num_inference_steps,
                          guidance_scale=g.guidance_scale, scheduler=g.scheduler,
                          height=config.resolution, width=config.resolution, seed=seeds,
                          mesh=mesh, data_axis=sharding.DATA)
        bar.update(n)
        yield np.asarray(out)[:n] * 2 - 1, np.full(n, k)
    bar.close()

  def produce(add):
    for images, labels in batches():
      add(images, labels)

  synth = reused_or_streamed(workdir, "generated", fp, class_names, produce)
  if hosts.is_lead():
    for k, name in enumerate(class_names):
      rows = np.flatnonzero(synth.labels == k)[:16]
      images_lib.save_png(images_lib.grid(synth.subset(rows).read(np.arange(len(rows)))),
                          workdir / f"samples_{name}.png",
                          {"synthetic": "true", "generator": "medjax.evaluate",
                           "prompt": prompts[name], "model": sd.name})
  return synth


def generator_train(config: Any, train, workdir) -> tuple[str, Any, list[str]]:
  """The images the generator trained on, re-read from its training workdirs' data configs (in
  stores `generator<i>_train`), its name and notes; the evaluation's real train split `train`
  when they are unknown (no training workdir with records.json)."""
  runs, _ = leakage.generator_records(config.model)
  if not runs:
    return "real train split", train, [
        "the generator's training images are unknown (no training workdir with records.json)"]
  parts = [load_split(c, "train", workdir, name=f"generator{i}_train")
           for i, (_, c) in enumerate(leakage.generator_data_configs(config, runs))]
  return "generator's training images", image_store.Chain(parts), []


def fid_reference(config: Any, train, test, workdir) -> tuple[str, Any, list[str]]:
  """The real images FID compares against (`config.fid.reference`), its name and notes."""
  ref = config.fid.reference
  if ref == "train":
    return "real train split", train, []
  if ref == "test":
    return "real test split", test, []
  if ref != "generator_train":
    raise MedjaxError(f"config.fid.reference={ref!r}: expected 'generator_train', 'train' or "
                      "'test'")
  name, images, notes = generator_train(config, train, workdir)
  if images is train:
    return name, train, [f"FID reference: {notes[0]}, so FID is against the evaluation's real "
                         "train split"]
  for p in images.parts:
    if tuple(p.class_names) != tuple(train.class_names):
      raise MedjaxError(f"config.fid.reference='generator_train': the generator's classes "
                        f"{list(p.class_names)} are not the evaluation's "
                        f"{list(train.class_names)}")
  return name, images, notes
