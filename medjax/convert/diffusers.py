"""The one map between PyTorch (diffusers/transformers) state dicts and medjax Flax params.

medjax modules are named after their diffusers/transformers counterparts, with list indices
joined by an underscore: `down_blocks.0.resnets.1.conv1.weight` is
`params['down_blocks_0']['resnets_1']['conv1']['kernel']`. So one rule covers every model:

* path: `name_<i>` <-> `name.<i>` for the list containers below;
* leaf: `kernel`/`scale`/`embedding` <-> `weight`, `bias` <-> `bias`;
* layout: conv kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in).

Import walks the Flax param *shapes* (so the module decides what must exist) and reports every
missing, unexpected or mis-shaped tensor in one error, never returning a partial model.
"""
from typing import Any, Mapping

import flax
import numpy as np

from medjax.errors import MedjaxError

# Module names that are Python lists in PyTorch (their children are indexed).
LIST_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers",
})

# Buffers PyTorch saves that carry no parameters.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)

# Old diffusers VAE attention names (before 0.14) -> current names.
_LEGACY_RENAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                   ".proj_attn.": ".to_out.0."}

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def flax_path_to_torch_key(path: tuple[str, ...], prefix: str = "") -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  parts = []
  for name in path[:-1]:
    base, _, index = name.rpartition("_")
    if base in LIST_CONTAINERS and index.isdigit():
      parts += [base, index]
    else:
      parts.append(name)
  leaf = path[-1]
  if leaf not in _LEAF_TO_TORCH:
    raise ValueError(f"unknown Flax param leaf {'/'.join(path)}")
  parts.append(_LEAF_TO_TORCH[leaf])
  return prefix + ".".join(parts)


def torch_to_flax_array(leaf: str, value: np.ndarray, target_ndim: int) -> np.ndarray:
  """Converts one PyTorch tensor to the layout of the Flax leaf `leaf` with `target_ndim` dims."""
  if leaf == "kernel" and target_ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == "kernel" and target_ndim == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # 1x1 conv saved for a linear layer
      value = value[:, :, 0, 0]
    return np.transpose(value) if value.ndim == 2 else value
  return value


def flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `torch_to_flax_array` (always to the current PyTorch layout)."""
  if leaf == "kernel" and value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and value.ndim == 2:
    return np.transpose(value)
  return value


def _upgrade_legacy_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in state_dict.items():
    if ".mid_block.attentions." in key or key.startswith("mid_block.attentions."):
      for old, new in _LEGACY_RENAMES.items():
        key = key.replace(old, new)
    out[key] = value
  return out


def _summarise(items: list[str], limit: int = 5) -> str:
  shown = ", ".join(items[:limit])
  return f"{len(items)} ({shown}{', ...' if len(items) > limit else ''})"


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], param_shapes: Any, *,
                         source: str, prefix: str = "", dtype=np.float32) -> dict:
  """Builds Flax params shaped like `param_shapes` from a PyTorch `state_dict`.

  Args:
    state_dict: PyTorch names -> NumPy arrays (any float dtype).
    param_shapes: the Flax param tree (arrays or ShapeDtypeStructs), e.g. from `jax.eval_shape`.
    source: the file the tensors came from, named in errors.
    prefix: a prefix PyTorch puts before every name (e.g. 'first_stage_model.').
    dtype: the dtype of the returned params.

  Raises:
    MedjaxError listing missing, unexpected and mis-shaped tensors (first few and counts).
  """
  state_dict = _upgrade_legacy_names(state_dict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shapes))
  params, missing, misshaped, used = {}, [], [], set()
  for path, target in flat.items():
    key = flax_path_to_torch_key(path, prefix)
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = torch_to_flax_array(path[-1], np.asarray(state_dict[key]), len(target.shape))
    if tuple(value.shape) != tuple(target.shape):
      misshaped.append(f"{key}: got {tuple(state_dict[key].shape)}, "
                       f"expected {tuple(flax_to_torch_array(path[-1], np.zeros(target.shape, np.int8)).shape)}")
      continue
    params[path] = np.asarray(value, dtype=dtype)
  unexpected = sorted(k for k in state_dict if k not in used and k.startswith(prefix)
                      and k[len(prefix):] not in IGNORED_KEYS and k not in IGNORED_KEYS)
  if missing or unexpected or misshaped:
    problems = []
    if missing:
      problems.append(f"missing {_summarise(missing)}")
    if unexpected:
      problems.append(f"unexpected {_summarise(unexpected)}")
    if misshaped:
      problems.append(f"wrong shape {_summarise(misshaped, 3)}")
    raise MedjaxError(f"{source}: weights do not match the model config: " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(params)


def params_to_state_dict(params: Any, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (names and layouts), the exact inverse of the import."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {flax_path_to_torch_key(path, prefix): np.ascontiguousarray(
              flax_to_torch_array(path[-1], np.asarray(value)).astype(dtype))
          for path, value in flat.items()}
