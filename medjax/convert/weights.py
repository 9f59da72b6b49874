"""Reading and writing weight files as NumPy, without torch where possible.

safetensors files go through the `safetensors` library (bf16 arrives as `ml_dtypes.bfloat16`,
which its NumPy path supports from 0.4.1 on; float8, which that path lacks, is decoded here from
the same bytes), with one-line errors for truncated or corrupt files. Pickle-based files (`.bin`,
`.ckpt`, `.pt`) are only read with `torch.load(weights_only=True)`, and `.ckpt`/`.pt` only when
the caller opts in. The old diffusers/transformers Flax weights (`*.msgpack`) are msgpack, read
with `flax.serialization` (no code runs on load).
"""
import json
import os
import re
import struct
from pathlib import Path

import flax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

from medjax.atomic import atomic_path
from medjax.errors import MedjaxError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_WRITABLE = frozenset(np.dtype(v) for v in _DTYPES.values())
# What the library's NumPy path returns itself; other dtypes (float8) are decoded here.
_LIBRARY_NUMPY = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"})


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into NumPy arrays."""
  path = Path(path)
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      names = list(f.keys())
      codes = {name: f.get_slice(name).get_dtype() for name in names}
      unsupported = sorted({c for c in codes.values() if c not in _DTYPES})
      if unsupported:
        raise MedjaxError(f"{path}: tensors of unsupported dtype {', '.join(unsupported)}")
      if set(codes.values()) <= _LIBRARY_NUMPY:
        return {name: f.get_tensor(name) for name in names}
    return {name: np.frombuffer(info["data"], _DTYPES[info["dtype"]]).reshape(info["shape"])
            for name, info in safetensors.deserialize(path.read_bytes())}
  except safetensors.SafetensorError as e:
    raise _refused(path, e) from e
  except OSError as e:
    raise MedjaxError(f"{path}: cannot read ({e.strerror or e})") from e


def read_safetensors_metadata(path) -> dict[str, str]:
  """The `__metadata__` strings of a .safetensors file ({} when it has none)."""
  path = Path(path)
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      return dict(f.metadata() or {})
  except safetensors.SafetensorError as e:
    raise _refused(path, e) from e
  except OSError as e:
    raise MedjaxError(f"{path}: cannot read ({e.strerror or e})") from e


def _refused(path: Path, error: Exception) -> MedjaxError:
  """The library's refusal of `path` as one line: what is wrong with the header when that can
  be said (it is JSON, but not tensor entries), else the library's reason."""
  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      (length,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(length)) if 8 + length <= size else {}
  except (OSError, ValueError, struct.error):
    header = {}
  if not isinstance(header, dict):
    return MedjaxError(f"{path}: not a safetensors file (its header is not a JSON object)")
  for name, info in header.items():
    if name != "__metadata__" and not _is_tensor_entry(info):
      return MedjaxError(f"{path}: not a safetensors file (header entry {name!r} = "
                         f"{str(info)[:80]}; expected dtype, shape and data_offsets)")
  reason = str(error).removeprefix("Error while deserializing header: ").strip()
  return MedjaxError(f"{path}: not a readable safetensors file, truncated or corrupt "
                     f"({reason or type(error).__name__})")


def _is_tensor_entry(info) -> bool:
  """A header entry {'dtype': str, 'shape': [ints >= 0], 'data_offsets': [start, end]}."""
  if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
    return False
  shape, offsets = info.get("shape"), info.get("data_offsets")
  ints = lambda xs: isinstance(xs, list) and all(
      isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
  return ints(shape) and ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
  """Writes NumPy arrays as .safetensors, atomically (temp file, then rename)."""
  path = Path(path)
  arrays = {}
  for name in sorted(tensors):
    # contiguous: the library writes an array's buffer as is, whatever its strides
    a = np.asarray(tensors[name])
    a = a if a.flags.c_contiguous else a.copy(order="C")
    if a.dtype not in _WRITABLE:
      raise MedjaxError(f"cannot write tensor {name!r} of dtype {a.dtype} to {path}")
    arrays[name] = a
  meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
  with atomic_path(path) as tmp:
    try:
      safetensors.numpy.save_file(arrays, tmp, metadata=meta)
    except safetensors.SafetensorError as e:
      code = re.search(r"os error (\d+)", str(e))
      if code:  # an I/O error (disk full, ...): an OSError naming `path` (atomic_path)
        raise OSError(int(code.group(1)), _os_text(str(e))) from None
      raise MedjaxError(f"{path}: cannot write safetensors file ({e})") from e


def _os_text(text: str) -> str:
  """'Error while serializing: I/O error: File too large (os error 27)' -> 'File too large'."""
  text = re.sub(r"\s*\(os error \d+\)\s*$", "", text)
  return text.rsplit(": ", 1)[-1]


def read_flax_msgpack(path) -> dict[tuple[str, ...], np.ndarray]:
  """Reads a Flax msgpack params file (`flax.serialization.to_bytes` of a params tree) as a flat
  {path: array} dict; a top-level 'params' collection is unwrapped."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise MedjaxError(f"{path}: cannot read ({e.strerror or e})") from e
  if data.startswith(b"version https://git-lfs"):
    raise MedjaxError(f"{path}: a git-lfs pointer, not the weights (run `git lfs pull` in the "
                      "clone)")
  try:
    tree = flax.serialization.msgpack_restore(data)
  except (ValueError, TypeError, KeyError) as e:  # msgpack's errors are ValueErrors
    raise MedjaxError(f"{path}: not a readable Flax msgpack file, truncated or corrupt "
                      f"({type(e).__name__}: {e})") from e
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  if not isinstance(tree, dict) or not tree:
    raise MedjaxError(f"{path}: not a Flax params file (expected a tree of arrays)")
  flat = flax.traverse_util.flatten_dict(tree)
  bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise MedjaxError(f"{path}: not a Flax params file ({'/'.join(map(str, bad[0]))} is "
                      f"{type(flat[bad[0]]).__name__}, not an array)")
  return flat


def torch_load(path, allow_pickle: bool):
  """`torch.load(path, weights_only=True)`, only on explicit opt-in, with one-line errors."""
  path = Path(path)
  if not allow_pickle:
    raise MedjaxError(f"{path}: is a pickle file; medjax reads it only on explicit opt-in "
                      "(allow_pickle=True), and then with torch.load(weights_only=True). "
                      "Prefer a .safetensors file.")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MedjaxError(f"{path}: reading a PyTorch pickle needs torch installed "
                      "(pip install torch), or convert it to .safetensors") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or unsafe files
    raise MedjaxError(f"{path}: torch.load(weights_only=True) failed: {e}") from e


def read_torch_pickle(path, allow_pickle: bool) -> dict[str, np.ndarray]:
  """Reads a PyTorch pickle (`.bin`/`.ckpt`/`.pt`) state dict as NumPy, only if allowed."""
  sd = torch_load(path, allow_pickle)
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  return {k: torch_to_numpy(v) for k, v in sd.items() if hasattr(v, "detach")}


def torch_to_numpy(t):
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def find_component_weights(folder, names: tuple[str, ...],
                           variant: str | None = None) -> Path | None:
  """A component's weights file in `folder`: `<stem>[.<variant>].safetensors`, then its sharded
  `.index.json`, then `.bin`, for each of the file stems `names` (e.g. `diffusion_pytorch_model`).
  None when there is none."""
  folder = Path(folder)
  suffix = f".{variant}" if variant else ""
  for stem in names:
    for candidate in (f"{stem}{suffix}.safetensors", f"{stem}.safetensors.index{suffix}.json",
                      f"{stem}{suffix}.safetensors.index.json"):
      if (folder / candidate).is_file():
        return folder / candidate
  return next((folder / f"{stem}{suffix}.bin" for stem in names
               if (folder / f"{stem}{suffix}.bin").is_file()), None)


def weight_variants(folder, names: tuple[str, ...]) -> list[str]:
  """The variants (`fp16`, ...) whose weight files `folder` holds for the stems `names`."""
  stems = "|".join(re.escape(n) for n in names)
  rx = re.compile(rf"(?:{stems})(?:\.safetensors\.index)?\.(\w+)\.(?:safetensors|bin|json)")
  folder = Path(folder)
  found = {m.group(1) for p in folder.iterdir() if (m := rx.fullmatch(p.name))} \
      if folder.is_dir() else set()
  return sorted(found - {"safetensors"})


def read_component_weights(folder, names: tuple[str, ...], variant: str | None = None,
                           allow_pickle_bin: bool = True,
                           alternatives: str = "") -> tuple[dict[str, np.ndarray], Path]:
  """Reads a diffusers/transformers component's weights from `folder` (`find_component_weights`).

  With no `variant` and no plain weights file, the one variant present is read (a cache that
  holds only `variant="fp16"` files loads as it is); several are an error naming them.
  `alternatives` names other accepted files in the error. Returns the state dict and the file it
  came from (for error messages).
  """
  folder = Path(folder)
  path = find_component_weights(folder, names, variant)
  variants = weight_variants(folder, names) if path is None and not variant else []
  if len(variants) == 1:
    path = find_component_weights(folder, names, variants[0])
    logging.info("%s: no plain weights file; reading the %r variant", folder, variants[0])
  if path is None:
    suffix = f".{variant}" if variant else ""
    expected = ", ".join(f"{s}{suffix}.safetensors" for s in names)
    found = f"; it has the variants {', '.join(variants)}: choose one" if variants else ""
    raise MedjaxError(f"{folder}: no weights found (expected {expected}, a sharded index, "
                      f"or .bin{alternatives}){found}")
  if path.name.endswith(".json"):
    sd = {}
    for shard in _index_shards(path):
      sd.update(read_safetensors(folder / shard))
    return sd, path
  if path.suffix == ".safetensors":
    return read_safetensors(path), path
  return read_torch_pickle(path, allow_pickle=allow_pickle_bin), path


def _index_shards(index: Path) -> list[str]:
  """The shard files a sharded `.safetensors.index.json` names (its weight_map's values)."""
  try:
    weight_map = json.loads(index.read_text()).get("weight_map")
  except (OSError, ValueError, AttributeError) as e:
    raise MedjaxError(f"{index}: not a valid safetensors index ({e})") from e
  if not (isinstance(weight_map, dict) and weight_map
          and all(isinstance(v, str) and v for v in weight_map.values())):
    raise MedjaxError(f"{index}: not a valid safetensors index (expected 'weight_map': "
                      "{tensor name: shard file name})")
  return sorted(set(weight_map.values()))


def summarise(items: list[str], limit: int = 5) -> str:
  shown = ", ".join(items[:limit])
  return f"{len(items)} ({shown}{', ...' if len(items) > limit else ''})"


def raise_if_mismatched(source: str, what: str, missing: list[str], unexpected: list[str],
                        misshaped: list[str]) -> None:
  """One error listing every missing, unexpected and wrong-shaped tensor of a weights file."""
  problems = []
  if missing:
    problems.append(f"missing {summarise(missing)}")
  if unexpected:
    problems.append(f"unexpected {summarise(unexpected)}")
  if misshaped:
    problems.append(f"wrong shape {summarise(misshaped, 3)}")
  if problems:
    raise MedjaxError(f"{source}: {what}: " + "; ".join(problems))
