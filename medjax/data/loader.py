"""The grain input pipeline: records -> shard -> shuffle -> decode/resize/prompt -> batches.

Determinism: the order depends only on (records, seed, process_index, process_count); random
crops use grain's per-index RNG. With `blocks=True` (training) the processes instead read the
blocks of one global stream's batches, so every process count sees the same global batches.
The returned iterator's `get_state()` / `set_state()` resume exactly where it stopped, including
inside an epoch and with worker processes.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from absl import logging
from PIL import Image

from medjax.data import phantoms
from medjax.data import picai
from medjax.data import prompts as prompts_lib
from medjax.data import records as records_lib
from medjax.data import selection
from medjax.data import skips as skips_lib
from medjax.data import split_file
from medjax.data import splits as splits_lib
from medjax.data.read_image import read_image
from medjax.data.sources import load_index
from medjax.errors import MedjaxError

RESIZE_MODES = ("crop", "pad", "stretch")
CROP_MODES = ("center", "random")
MIN_SIDE = 8  # px: a smaller "image" (a 1 x 1 placeholder) would be upscaled into a flat square
# resize='crop' keeps a square of the shorter side: beyond this aspect ratio that is a sliver of
# the file, and its upscaled intermediate (shorter side -> resolution) can take gigabytes.
MAX_CROP_ASPECT = 16
_AUTO = "auto"


def _splits(names: Any, key: str) -> tuple[str, ...]:
  """`config.data.<key>`: a tuple of split names, each checked."""
  if isinstance(names, str) or any(n not in splits_lib.SPLITS for n in names):
    raise MedjaxError(f"config.data.{key}={names!r}: expected a tuple of split names from "
                      f"{splits_lib.SPLITS}")
  return tuple(names)


def select_records(config: Any, split: str) -> records_lib.DataIndex:
  """The records of one split after classes, splits and the per-class selection.

  Args:
    config: `config.data` (see `default_config()`).
    split: 'train', 'val' or 'test'.

  Returns:
    A DataIndex sorted by key, with `class_names` set.

  Raises:
    MedjaxError for a bad configuration or an empty selection.
  """
  splits_lib.check_split(split)
  fraction = skips_lib.check_fraction(config.max_bad_fraction)
  index = load_index(config)
  where = f"{config.root or 'phantoms'} ({config.source or 'phantoms'})"
  skips_lib.check_index(index.skipped, index.records, fraction, where)
  classes = selection.parse_classes(config.classes)
  class_names = tuple(name for name, _ in classes)
  records = selection.assign_classes(index.records, classes, index.label_names)
  if not records:
    raise MedjaxError(f"{where}: no images match the filters and classes {config.classes!r}")
  s = config.split
  if s.file:
    assigned = split_file.assignment(config, records, class_names)
    records = [r for r in records if assigned.get(r.key) == split]
  else:
    records = splits_lib.split_records(records, split, mode=s.mode, fractions=s.fractions,
                                       sizes=s.sizes, seed=s.seed, class_names=class_names,
                                       source_test=s.source_test,
                                       source_val_fraction=s.source_val_fraction)
  if split in _splits(config.per_class_splits, "per_class_splits"):
    records = selection.per_class(records, int(config.per_class), s.seed, class_names,
                                  f"{where}, split {split!r}")
  records = selection.keep_classes(records, config.keep_classes, class_names)
  if not records:
    raise MedjaxError(f"{where}: split {split!r} is empty after filters, classes and split "
                      f"(mode={s.mode!r})")
  records = sorted(records, key=lambda r: r.key)
  return index.replace(records, class_names=class_names)


@dataclasses.dataclass(frozen=True)
class BadFile:
  """Produced instead of an example when a file cannot be decoded."""
  message: str
  key: str = ""  # the file (or record) at fault: bad files are counted once each


def _lanczos(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize(
          (width, height), Image.Resampling.LANCZOS)) for c in range(image.shape[-1])]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def resize_to(image: np.ndarray, resolution: int, *, mode: str = "crop", crop: str = "center",
              rng: np.random.Generator | None = None) -> np.ndarray:
  """(H, W, C) in [0, 1] -> (resolution, resolution, C) with Lanczos resampling.

  'crop' scales the shorter side to `resolution` and crops the longer one (centre or random),
  'pad' scales the longer side and pads with black, 'stretch' ignores the aspect ratio.
  """
  height, width = image.shape[:2]
  if mode == "stretch":
    return _lanczos(image, resolution, resolution)
  if mode == "crop":
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    resized = _lanczos(image, new_h, new_w)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    if crop == "random" and rng is not None:
      top = int(rng.integers(0, new_h - resolution + 1))
      left = int(rng.integers(0, new_w - resolution + 1))
    return resized[top:top + resolution, left:left + resolution]
  scale = resolution / max(height, width)
  new_h = max(1, min(resolution, round(height * scale)))
  new_w = max(1, min(resolution, round(width * scale)))
  out = np.zeros((resolution, resolution, image.shape[-1]), np.float32)
  top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
  out[top:top + new_h, left:left + new_w] = _lanczos(image, new_h, new_w)
  return out


class LoadExample:
  """record -> example dict (or BadFile); runs in grain's threads / worker processes."""

  def __init__(self, *, resolution: int, label_names: Sequence[str], class_names: Sequence[str],
               prompt_config: dict[str, Any], resize: str, crop: str, flip: bool,
               cache_dir: str = ""):
    if resize not in RESIZE_MODES:
      raise MedjaxError(f"config.data.pipeline.resize={resize!r}: expected one of {RESIZE_MODES}")
    if crop not in CROP_MODES:
      raise MedjaxError(f"config.data.pipeline.crop={crop!r}: expected one of {CROP_MODES}")
    prompts_lib.check_prompt_config(prompt_config)
    self.resolution = int(resolution)
    self.label_names = tuple(label_names)
    self.class_names = tuple(class_names)
    self.prompt_config = prompt_config
    self.resize, self.crop, self.flip = resize, crop, bool(flip)
    self.cache_dir = cache_dir

  def pixels(self, record: records_lib.Record) -> np.ndarray:
    """Float32 (H, W, C) in [0, 1] for any record kind."""
    if record.kind == "file":
      image = read_image(record.path)
    elif record.kind == "picai":
      image = picai.load_slice(record, self.cache_dir)
    elif record.kind == "phantom_cxr":
      image = phantoms.chest_xray(self.resolution, seed=record.get("seed"),
                                  effusion=record.get("effusion"),
                                  effusion_side=record.get("effusion_side"),
                                  cardiomegaly=record.get("cardiomegaly"))
    elif record.kind == "phantom_mri":
      image = phantoms.prostate_mri(self.resolution, seed=record.get("seed"),
                                    lesion=record.get("lesion"))
    else:
      raise MedjaxError(f"{record.key}: unknown record kind {record.kind!r}")
    return image[..., None] if image.ndim == 2 else image

  def __call__(self, record: records_lib.Record, rng: np.random.Generator):
    where = record.path or record.key  # also what bad files are counted by (PI-CAI: a study)
    try:
      image = self.pixels(record)
    except MedjaxError as e:
      return BadFile(str(e), where)
    if not np.isfinite(image).all():
      return BadFile(f"{where}: image contains NaN or infinite values", where)
    short, long = sorted(image.shape[:2])
    if short < MIN_SIDE:
      return BadFile(f"{where}: image is {image.shape[1]} x {image.shape[0]} px; expected at "
                     f"least {MIN_SIDE} px a side", where)
    if self.resize == "crop" and long > MAX_CROP_ASPECT * short:
      return BadFile(f"{where}: image is {image.shape[1]} x {image.shape[0]} px, more than "
                     f"{MAX_CROP_ASPECT}:1; config.data.pipeline.resize='crop' would keep a "
                     "sliver of it (resize='pad' keeps it whole)", where)
    image = resize_to(image.astype(np.float32), self.resolution, mode=self.resize, crop=self.crop,
                      rng=rng)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    labels = np.array([record.labels.get(n, 0.0) for n in self.label_names], np.float32)
    mask = np.array([n in record.labels for n in self.label_names], bool)
    return {
        "image": np.ascontiguousarray(image * 2.0 - 1.0, dtype=np.float32),
        "prompt": prompts_lib.make_prompt(record, self.prompt_config, self.class_names),
        "label": np.int32(record.class_index),
        "labels": labels,
        "label_mask": mask,
        "key": record.key,
    }


def _stack(elements: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {
      "image": np.stack([e["image"] for e in elements]),
      "prompt": np.array([e["prompt"] for e in elements], dtype=np.str_),
      "label": np.array([e["label"] for e in elements], np.int32),
      "labels": np.stack([e["labels"] for e in elements]),
      "label_mask": np.stack([e["label_mask"] for e in elements]),
      "key": np.array([e["key"] for e in elements], dtype=np.str_),
  }


class DataIterator(grain.DatasetIterator):
  """Batches examples, applies `on_bad_file`, and checkpoints with its parent iterator.

  Bad files are counted once each however often a repeating stream re-reads them, and bounded
  by `max_bad_fraction` (`medjax.data.skips`); the count travels in the state.

  Attributes:
    skipped: 'file: problem' for every distinct file skipped while indexing and reading.
    label_names, class_names, num_examples: set by `make_dataset` (this process's shard size).
  """

  def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, drop_remainder: bool,
               on_bad_file: str, ledger: skips_lib.SkipLedger):
    super().__init__(parent)
    self.batch_size = batch_size
    self.drop_remainder = drop_remainder
    self.on_bad_file = on_bad_file
    self.ledger = ledger
    self._reported = False

  @property
  def skipped(self) -> list[str]:
    return self.ledger.messages()

  @property
  def num_skipped(self) -> int:
    """Distinct bad files (indexing and reading), each counted once."""
    return self.ledger.count

  def skip_report(self) -> str:
    return self.ledger.report()

  def skip_summary(self) -> dict:
    """This process's skips for `medjax.data.skips.merge` (JSON-able)."""
    return self.ledger.summary()

  def __next__(self) -> dict[str, np.ndarray]:
    elements = []
    while len(elements) < self.batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if elements and not self.drop_remainder:
          break
        if self.num_skipped and not self._reported:
          self._reported = True
          logging.warning("medjax.data: %s", self.skip_report())
        raise
      if isinstance(element, BadFile):
        if self.on_bad_file == "error":
          raise MedjaxError(element.message)
        self.ledger.bad(element.key, element.message)
        continue
      self.ledger.good()
      elements.append(element)
    return _stack(elements)

  def get_state(self) -> dict[str, Any]:
    skips = self.ledger.get_state()
    return {"parent": self._parent.get_state(), "read_skips": len(skips["bad"]), "skips": skips}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.ledger.set_state(state.get("skips"))


class _Blocks(grain.MapDataset):
  """Block `index` of every run of `count` blocks of `size` consecutive elements: the rows one
  process holds of each global batch of `size * count` (a partial last global batch is dropped).
  """

  def __init__(self, parent: grain.MapDataset, *, size: int, index: int, count: int):
    super().__init__(parent)
    self._size, self._index, self._count = size, index, count

  def __len__(self) -> int:
    return len(self._parent) // (self._size * self._count) * self._size

  def _parent_index(self, i: int) -> int:
    block, offset = divmod(i, self._size)
    return (block * self._count + self._index) * self._size + offset

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def _getitems(self, indices):
    get = self._parent._getitems  # pylint: disable=protected-access
    return get([self._parent_index(i) for i in indices])

  def __str__(self) -> str:
    return f"_Blocks(size={self._size}, index={self._index}, count={self._count})"


class _BatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, **options):
    super().__init__(parent)
    self.options = options

  def __iter__(self) -> DataIterator:
    return DataIterator(iter(self._parent), **self.options)


def _process(process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise MedjaxError(f"process_index={process_index} must be in [0, {process_count})")
  return process_index, process_count


def make_dataset(config: Any, split: str, batch_size: int, seed: int = 0, resolution: int = 512,
                 process_index: int | None = None, process_count: int | None = None, *,
                 num_epochs: Any = _AUTO, shuffle: bool | None = None,
                 drop_remainder: bool | None = None, blocks: bool = False) -> DataIterator:
  """A checkpointable iterator of batches for this process.

  Args:
    config: `config.data` (see `default_config()`).
    split: 'train', 'val' or 'test'.
    batch_size: per-process batch size.
    seed: shuffling and random-crop seed (the split itself uses `config.split.seed`).
    resolution: output height and width.
    process_index, process_count: this host's shard; default: jax.process_index()/count().
    num_epochs: None = forever; default: forever for shuffled splits, else 1.
    shuffle: default: split in `config.pipeline.shuffle_splits` (train).
    drop_remainder: drop a last partial batch; default: True when shuffled. With several
      processes and True, every process also gets the same number of examples.
    blocks: shard by global batch instead of by record: all processes walk one stream (the
      whole split shuffled with `seed`, random crops seeded by stream position) and process i
      reads block i of each global batch of `batch_size * process_count` elements. The global
      batches, row for row, are then the same for any process count (a 1-process run equals an
      N-process one); with one process it is the plain stream. Needs drop_remainder.

  Returns:
    DataIterator of dicts: image float32 [B, H, W, 3] in [-1, 1]; prompt str [B]; label int32
    [B] (class index, -1 without classes); labels float32 [B, L] and label_mask bool [B, L]
    over `label_names` (mask False = unknown); key str [B]. `iterator.get_state()` /
    `set_state()` resume exactly; `iterator.skipped` lists skipped files.
  """
  if batch_size < 1:
    raise MedjaxError(f"batch_size={batch_size} must be positive")
  if resolution < 8:
    raise MedjaxError(f"resolution={resolution} is too small (minimum 8)")
  process_index, process_count = _process(process_index, process_count)
  p = config.pipeline
  for key in ("worker_count", "read_threads", "prefetch"):
    value = p[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise MedjaxError(f"config.data.pipeline.{key}={value!r}: expected an integer >= 0")
  index = select_records(config, split)
  if shuffle is None:
    shuffle = split in _splits(p.shuffle_splits, "pipeline.shuffle_splits")
  num_epochs = (None if shuffle else 1) if num_epochs == _AUTO else num_epochs
  drop_remainder = shuffle if drop_remainder is None else drop_remainder

  records = index.records
  if blocks and not drop_remainder:
    raise MedjaxError("make_dataset(blocks=True) needs drop_remainder (whole global batches)")
  if not blocks:
    if process_count > 1 and drop_remainder:
      records = records[:len(records) // process_count * process_count]
    records = records[process_index::process_count]
  per_process = len(records) // process_count if blocks else len(records)
  if not records or (drop_remainder and num_epochs is not None
                     and per_process * num_epochs < batch_size):
    raise MedjaxError(f"split {split!r} has {len(index.records)} images: too few for "
                      f"{process_count} process(es) x batch size {batch_size}")
  if index.skipped:
    logging.warning("medjax.data: skipped %d bad file(s) while indexing, e.g. %s",
                    len(index.skipped), index.skipped[0])
  ledger = skips_lib.SkipLedger(
      index_skipped=index.skipped, file_index=skips_lib.file_index(index.records),
      pass_size=per_process, max_bad_fraction=config.max_bad_fraction, sampled=shuffle)

  prompt = config.prompt
  prompt_config = prompt.to_dict() if hasattr(prompt, "to_dict") else dict(prompt)
  loader = LoadExample(resolution=resolution, label_names=index.label_names,
                       class_names=index.class_names, prompt_config=prompt_config,
                       resize=p.resize, crop=p.crop, flip=p.flip,
                       cache_dir=config.picai.cache_dir)
  dataset = grain.MapDataset.source(records)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.random_map(loader, seed=seed)
  if blocks:
    dataset = _Blocks(dataset, size=batch_size, index=process_index, count=process_count)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=int(p.read_threads), prefetch_buffer_size=int(p.prefetch)))
  if int(p.worker_count) > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read its absl flags; outside absl.app (scripts, notebooks, pytest)
      # nothing parsed them, so use their defaults instead of failing in the worker.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(p.worker_count), per_worker_buffer_size=max(1, batch_size)))
  batched = _BatchDataset(iter_dataset, batch_size=batch_size, drop_remainder=drop_remainder,
                          on_bad_file=config.on_bad_file, ledger=ledger)
  iterator = iter(batched)
  iterator.label_names = index.label_names
  iterator.class_names = index.class_names
  iterator.records = index.records  # the whole split's, on every process
  iterator.num_examples = per_process
  return iterator
