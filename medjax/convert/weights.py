"""Reading and writing PyTorch weight files as NumPy, without torch where possible.

safetensors is read directly (header + memory map) so bf16/fp16 files load without torch and a
truncated or corrupt file gives a clear error. Pickle-based files (`.bin`, `.ckpt`, `.pt`) are
only read with `torch.load(weights_only=True)`, and `.ckpt`/`.pt` only when the caller opts in.
"""
import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from medjax.atomic import atomic_path
from medjax.errors import MedjaxError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into NumPy arrays (memory-mapped, read-only)."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      size = os.fstat(f.fileno()).st_size
      (header_len,) = struct.unpack("<Q", f.read(8))
      if size < 8 or header_len > size - 8:
        raise ValueError(f"header length {header_len} exceeds file size {size}")
      header = json.loads(f.read(header_len))
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else b""
  except (OSError, ValueError, struct.error) as e:
    raise MedjaxError(f"{path}: not a readable safetensors file ({e})") from e
  if not isinstance(header, dict):
    raise MedjaxError(f"{path}: not a safetensors file (its header is not a JSON object)")
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not _is_tensor_entry(info):
      raise MedjaxError(f"{path}: not a safetensors file (header entry {name!r} = "
                        f"{str(info)[:80]}; expected dtype, shape and data_offsets)")
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise MedjaxError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if base + end > size or end - start != count * np.dtype(dtype).itemsize:
      raise MedjaxError(f"{path}: tensor {name!r} is truncated or corrupt (expected {count} x "
                        f"{info['dtype']} at bytes {start}..{end}, file has {size})")
    out[name] = np.frombuffer(buf, dtype=dtype, count=count,
                              offset=base + start).reshape(info["shape"])
  return out


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
  header, offset, arrays = {}, 0, []
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name in sorted(tensors):
    a = np.ascontiguousarray(np.asarray(tensors[name]))
    if a.dtype not in _CODES:
      raise MedjaxError(f"cannot write tensor {name!r} of dtype {a.dtype} to {path}")
    header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())


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


def read_component_weights(folder, names: tuple[str, ...], variant: str | None = None,
                           allow_pickle_bin: bool = True) -> tuple[dict[str, np.ndarray], Path]:
  """Reads a diffusers/transformers component's weights from `folder`.

  Looks for `<name>[.<variant>].safetensors`, then its sharded `.index.json`, then `.bin`
  (torch, `weights_only=True`). `names` are file stems such as `diffusion_pytorch_model`.
  Returns the state dict and the file it came from (for error messages).
  """
  folder = Path(folder)
  suffix = f".{variant}" if variant else ""
  for stem in names:
    single = folder / f"{stem}{suffix}.safetensors"
    if single.is_file():
      return read_safetensors(single), single
    index = folder / f"{stem}.safetensors.index{suffix}.json"
    if not index.is_file():
      index = folder / f"{stem}{suffix}.safetensors.index.json"
    if index.is_file():
      shards = _index_shards(index)
      sd = {}
      for shard in shards:
        sd.update(read_safetensors(folder / shard))
      return sd, index
  for stem in names:
    binary = folder / f"{stem}{suffix}.bin"
    if binary.is_file():
      return read_torch_pickle(binary, allow_pickle=allow_pickle_bin), binary
  expected = ", ".join(f"{s}{suffix}.safetensors" for s in names)
  raise MedjaxError(f"{folder}: no weights found (expected {expected}, a sharded index, or .bin)")


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
