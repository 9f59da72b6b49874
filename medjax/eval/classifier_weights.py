"""torchvision ResNet / DenseNet state dicts -> Flax variables of `medjax.eval.classifiers`.

Optional: users who have ImageNet weights (e.g. `torchvision.models.resnet18(weights=...)`
saved as `.safetensors`, preferred, or a `.pth` read with `torch_load(allow_pickle=True)`)
start from them; medjax never downloads weights. Flax module names are torchvision's with
'.' -> '_' (DenseNet modules sit under torchvision's `features.`), so the map is by rule:
conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O], linear `weight` -> transposed `kernel`,
BatchNorm `weight`/`bias` -> `scale`/`bias`, `running_mean`/`running_var` -> batch_stats
`mean`/`var`; `num_batches_tracked` is ignored.
"""
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from medjax.convert.weights import raise_if_mismatched
from medjax.convert.weights import read_safetensors
from medjax.convert.weights import torch_load
from medjax.convert.weights import torch_to_numpy
from medjax.errors import MedjaxError
from medjax.eval.classifiers import HEAD_NAMES
from medjax.eval.classifiers import init_variables

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}
# Old torchvision DenseNet checkpoints: 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight'.
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _torch_key(collection: str, path: tuple[str, ...], features_prefix: bool) -> str:
  modules = [m.replace("_", ".") for m in path[:-1]]
  prefix = "features." if features_prefix and path[0] not in HEAD_NAMES else ""
  return prefix + ".".join(modules + [_LEAF[(collection, path[-1])]])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == "kernel" and value.ndim == 2:
    return value.T
  return value


def state_dict_to_variables(state_dict: Mapping[str, Any], variables: Mapping[str, Any], *,
                            source: str = "state dict", skip_head: bool = False) -> dict:
  """Flax {'params', 'batch_stats'} shaped like `variables` from a torchvision state dict.

  Args:
    state_dict: torchvision names -> NumPy arrays or torch tensors.
    variables: the model's variables (arrays or ShapeDtypeStructs, boxed or not), e.g.
      `jax.eval_shape(model.init, key, x)`.
    source: named in errors.
    skip_head: keep `variables`' own head (`fc` / `classifier`, which must then hold arrays)
      and ignore the checkpoint's, e.g. ImageNet's 1000 classes for a 1-logit task.

  Raises:
    MedjaxError listing missing, unexpected and mis-shaped tensors together.
  """
  sd = {}
  for key, value in state_dict.items():
    key = _LEGACY_DENSENET.sub(r"\1\2", key)
    sd[key] = torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)
  variables = nn.unbox(flax.core.unfreeze(variables))
  features_prefix = any(k.startswith("features.") for k in sd)
  out, missing, misshaped, used = {}, [], [], set()
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(variables.get(collection, {}))
    for path, target in flat.items():
      if skip_head and path[0] in HEAD_NAMES:
        out[(collection,) + path] = np.asarray(target)
        continue
      key = _torch_key(collection, path, features_prefix)
      if key not in sd:
        missing.append(key)
        continue
      used.add(key)
      value = _to_flax(path[-1], sd[key])
      if tuple(value.shape) != tuple(target.shape):
        misshaped.append(f"{key}: got {tuple(sd[key].shape)} for Flax {tuple(target.shape)}")
        continue
      out[(collection,) + path] = np.asarray(value, np.float32)
  ignored = lambda k: k.endswith("num_batches_tracked") or (
      skip_head and k.removeprefix("features.").split(".")[0] in HEAD_NAMES)
  unexpected = sorted(k for k in sd if k not in used and not ignored(k))
  raise_if_mismatched(source, "weights do not match the classifier", missing, unexpected,
                      misshaped)
  return flax.traverse_util.unflatten_dict(out)


def read_torchvision_weights(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A torchvision state dict from `.safetensors` (preferred) or a pickle `.pth`/`.pt` (opt-in)."""
  path = Path(path)
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  sd = torch_load(path, allow_pickle=allow_pickle)
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise MedjaxError(f"{path}: expected a state dict, got {type(sd).__name__}")
  return {k: torch_to_numpy(v) for k, v in sd.items() if hasattr(v, "detach")}


def load_torchvision(path, model: nn.Module, input_shape=(1, 224, 224, 3), *,
                     allow_pickle: bool = False, skip_head: bool = False, seed: int = 0) -> dict:
  """Reads `path` into `model`'s {'params', 'batch_stats'} (see `state_dict_to_variables`).

  With `skip_head`, the head is initialised from `seed` (`classifiers.init_variables`).
  """
  if skip_head:
    variables = init_variables(model, input_shape, seed)
  else:
    x = jax.ShapeDtypeStruct(tuple(input_shape), jax.numpy.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x)
  return state_dict_to_variables(read_torchvision_weights(path, allow_pickle), variables,
                                 source=str(path), skip_head=skip_head)
