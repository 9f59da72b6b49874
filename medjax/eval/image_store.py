"""On-disk image sets for evaluation, so peak memory does not grow with a split's size.

A store is a folder: `images.u8` (raw uint8 rows [N, H, W, C], C-order), `labels.npy`,
`keys.json` (record keys) and `manifest.json` (count, shape, class names, the fingerprint of
what made it). `StoreWriter` appends batches as they are made into a temp folder and renames it
into place once complete, so a store either exists whole or not at all, and a complete store
whose fingerprint matches can be reused on resume (`open_store`). Reads are explicit positioned
reads (`os.preadv` into a fresh buffer), never `np.memmap`: mapped pages would count toward the
process's resident memory.

Pixels are quantised to uint8 as a PNG would hold them: floats in [-1, 1] (what
`medjax.data.make_dataset` and the protocols use) map to round((x + 1) / 2 * 255).
"""
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from medjax.errors import MedjaxError

FORMAT = "medjax-image-store-1"
IMAGES, LABELS, KEYS, MANIFEST = "images.u8", "labels.npy", "keys.json", "manifest.json"


def to_uint8(images) -> np.ndarray:
  """Floats in [-1, 1] -> uint8 [0, 255] (clipped, rounded); uint8 passes through."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 in [-1, 1]."""
  return images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


class _Rows(Sequence):
  """Reads shared by stores, views and chains; subclasses define `read`, `__len__`, `shape`."""
  shape: tuple
  labels: np.ndarray

  def read(self, positions) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.read(np.arange(len(self))[i])
    return self.read([i])[0]

  def read_range(self, start: int, stop: int) -> np.ndarray:
    return self.read(np.arange(start, min(stop, len(self))))

  def floats(self, positions) -> np.ndarray:
    return to_float(self.read(positions))

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """float32 [-1, 1] batches in order (the last one may be short)."""
    for start in range(0, len(self), batch_size):
      yield to_float(self.read_range(start, start + batch_size))


class ImageStore(_Rows):
  """Read side of a store, or a view of some of its rows (`subset`, `head`).

  `store[i]` is a uint8 [H, W, C] image; `read(indices)` uint8 rows; `floats(indices)` float32
  in [-1, 1]; `labels` and `keys` follow the view's rows.
  """

  def __init__(self, path, manifest: dict, labels: np.ndarray, keys: list[str],
               rows: np.ndarray | None = None):
    self.path = Path(path)
    self.manifest = manifest
    self.shape = tuple(manifest["shape"])
    self.class_names = tuple(manifest.get("class_names", ()))
    self.fingerprint = manifest.get("fingerprint", "")
    self._all_labels, self._all_keys = labels, keys
    self.rows = np.arange(manifest["count"]) if rows is None else np.asarray(rows, np.int64)
    self.labels = labels[self.rows]
    self._row_bytes = int(np.prod(self.shape))

  @property
  def keys(self) -> list[str]:
    return [self._all_keys[i] for i in self.rows] if self._all_keys else []

  def __len__(self) -> int:
    return len(self.rows)

  def subset(self, positions) -> "ImageStore":
    """A view of these positions (indices into this view, or a boolean mask)."""
    positions = np.arange(len(self))[np.asarray(positions)]
    return ImageStore(self.path, self.manifest, self._all_labels, self._all_keys,
                      self.rows[positions])

  def head(self, n: int | None) -> "ImageStore":
    """The first `n` rows (all when n is None or 0)."""
    return self if not n else self.subset(np.arange(min(n, len(self))))

  def read(self, positions) -> np.ndarray:
    """uint8 [len(positions), H, W, C]; contiguous runs of rows are read in one call each."""
    rows = self.rows[np.asarray(positions, np.int64)]
    out = np.empty((len(rows),) + self.shape, np.uint8)
    if not len(rows):
      return out
    flat = out.reshape(len(rows), -1)
    with open(self.path / IMAGES, "rb", buffering=0) as f:
      fd, i = f.fileno(), 0
      while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
          j += 1
        _pread_into(fd, flat[i:j].reshape(-1), int(rows[i]) * self._row_bytes, self.path)
        i = j
    return out



class Chain(_Rows):
  """Stores (or views) read as one, in order, e.g. real + synthetic training images."""

  def __init__(self, parts: Sequence[_Rows]):
    self.parts = list(parts)
    shapes = {tuple(p.shape) for p in self.parts}
    if len(shapes) != 1:
      raise MedjaxError(f"image stores of different image shapes {sorted(shapes)}")
    self.shape = shapes.pop()
    self.class_names = getattr(self.parts[0], "class_names", ())
    self.labels = np.concatenate([p.labels for p in self.parts])
    self._starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  @property
  def keys(self) -> list[str]:
    """The parts' record keys in order; [] when a part has none."""
    parts = [list(getattr(p, "keys", [])) for p in self.parts]
    if any(len(k) != len(p) for k, p in zip(parts, self.parts, strict=True)):
      return []
    return [k for ks in parts for k in ks]

  def subset(self, positions) -> "_Rows":
    """A view of these positions (ascending indices, or a boolean mask) across the parts."""
    positions = np.arange(len(self))[np.asarray(positions)]
    parts = []
    for k, p in enumerate(self.parts):
      lo, hi = self._starts[k], self._starts[k + 1]
      chosen = positions[(positions >= lo) & (positions < hi)] - lo
      if len(chosen):
        parts.append(p.subset(chosen))
    return Chain(parts) if parts else self.parts[0].subset(np.zeros(0, np.int64))

  def head(self, n: int | None) -> "_Rows":
    return self if not n else self.subset(np.arange(min(n, len(self))))

  def read(self, positions) -> np.ndarray:
    positions = np.asarray(positions, np.int64)
    out = np.empty((len(positions),) + self.shape, np.uint8)
    part = np.searchsorted(self._starts, positions, side="right") - 1
    for k, p in enumerate(self.parts):
      chosen = part == k
      if chosen.any():
        out[chosen] = p.read(positions[chosen] - self._starts[k])
    return out


def _pread_into(fd: int, buffer: np.ndarray, offset: int, path: Path) -> None:
  view, done = memoryview(buffer), 0
  while done < len(view):
    n = os.preadv(fd, [view[done:]], offset + done)
    if n <= 0:
      raise MedjaxError(f"{path / IMAGES}: file ends before row data at byte {offset + done} "
                        "(a truncated store: delete the folder to rebuild it)")
    done += n


def open_store(path, fingerprint: str | None = None) -> ImageStore | None:
  """The complete store at `path` (whose fingerprint matches, when given), else None."""
  path = Path(path)
  try:
    manifest = json.loads((path / MANIFEST).read_text())
  except (OSError, ValueError):
    return None
  if manifest.get("format") != FORMAT:
    return None
  if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
    return None
  try:
    size = (path / IMAGES).stat().st_size
    labels = np.load(path / LABELS)
    keys = json.loads((path / KEYS).read_text())
  except (OSError, ValueError):
    return None
  count = int(manifest["count"])
  if size != count * int(np.prod(manifest["shape"])) or len(labels) != count:
    return None
  return ImageStore(path, manifest, labels, keys)


class StoreWriter:
  """Appends batches to a temp folder beside `path`; `close()` renames it to `path`.

  Use as a context manager: on an error the temp folder is removed and `path` is untouched.
  """

  def __init__(self, path, class_names: Sequence[str] = (), fingerprint: str = ""):
    self.path = Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp"
    self._tmp.mkdir()
    self._file = open(self._tmp / IMAGES, "wb")  # pylint: disable=consider-using-with
    self._labels: list[np.ndarray] = []
    self._keys: list[str] = []
    self._shape: tuple | None = None
    self.count = 0
    self.class_names = tuple(class_names)
    self.fingerprint = fingerprint

  def add(self, images, labels, keys: Sequence[str] | None = None) -> None:
    """images: float [B, H, W, C] in [-1, 1] or uint8; labels [B]; keys: B strings or None."""
    images = to_uint8(images)
    if images.ndim != 4:
      raise MedjaxError(f"image store {self.path}: images must be [B, H, W, C], got "
                        f"{images.shape}")
    if self._shape is None:
      self._shape = images.shape[1:]
    elif images.shape[1:] != self._shape:
      raise MedjaxError(f"image store {self.path}: images of shape {images.shape[1:]} after "
                        f"{self._shape}")
    labels = np.asarray(labels)
    if len(labels) != len(images):
      raise MedjaxError(f"image store {self.path}: {len(images)} images, {len(labels)} labels")
    self._file.write(np.ascontiguousarray(images).tobytes())
    self._labels.append(labels)
    if keys is not None:
      self._keys.extend(str(k) for k in keys)
    self.count += len(images)

  def close(self) -> ImageStore:
    self._file.close()
    if not self.count:
      self.abort()
      raise MedjaxError(f"image store {self.path}: no images")
    labels = np.concatenate(self._labels)
    np.save(self._tmp / LABELS, labels)
    keys = self._keys if len(self._keys) == self.count else []
    (self._tmp / KEYS).write_text(json.dumps(keys))
    manifest = {"format": FORMAT, "count": self.count, "shape": list(self._shape),
                "dtype": "uint8", "class_names": list(self.class_names),
                "fingerprint": self.fingerprint}
    (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if self.path.exists():
      shutil.rmtree(self.path)
    os.replace(self._tmp, self.path)
    return ImageStore(self.path, manifest, labels, keys)

  def abort(self) -> None:
    if not self._file.closed:
      self._file.close()
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> "StoreWriter":
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is not None:
      self.abort()
