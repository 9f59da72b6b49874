"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> medjax variables.

The result is a Flax variables dict `{'params': ..., 'batch_stats': ...}` for
`medjax.eval.inception.InceptionV3`: conv kernels OIHW -> HWIO, BatchNorm `weight`/`bias` in
`params` as `scale`/`bias`, `running_mean`/`running_var` in `batch_stats` as `mean`/`var` (not
folded into the convs, so the arithmetic is PyTorch's). Names map 1:1:
`Mixed_6b.branch7x7_2.conv.weight` <-> `params/Mixed_6b/branch7x7_2/conv/kernel`. The state
dict of pytorch-fid's `InceptionV3` wrapper (`blocks.2.4.branch1x1...`) is accepted as well;
`fc.*` (the 1008-way classifier) and `num_batches_tracked` are not needed and ignored.

medjax never downloads the file. pytorch-fid keeps it in torch hub's cache; a `.pth` is read
with `torch.load(weights_only=True)` and only when the caller passes `allow_pickle=True`
(`medjax.convert.weights.torch_load`). Convert it once to `.safetensors` to avoid pickles:
`python -m medjax.eval.inception_weights pt_inception-2015-12-05-6726825d.pth
inception.safetensors`.
"""
import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.convert.weights import raise_if_mismatched
from medjax.convert.weights import read_safetensors
from medjax.convert.weights import torch_load
from medjax.convert.weights import torch_to_numpy
from medjax.convert.weights import write_safetensors
from medjax.errors import MedjaxError
from medjax.eval.inception import INPUT_SIZE
from medjax.eval.inception import InceptionV3

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
ENV_VAR = "MEDJAX_INCEPTION_WEIGHTS"

# pytorch-fid's `InceptionV3.blocks` (wrapper state dict) -> torchvision/fid_inception_v3 names.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    "blocks.2.0": "Mixed_5b", "blocks.2.1": "Mixed_5c", "blocks.2.2": "Mixed_5d",
    "blocks.2.3": "Mixed_6a", "blocks.2.4": "Mixed_6b", "blocks.2.5": "Mixed_6c",
    "blocks.2.6": "Mixed_6d", "blocks.2.7": "Mixed_6e",
    "blocks.3.0": "Mixed_7a", "blocks.3.1": "Mixed_7b", "blocks.3.2": "Mixed_7c",
}
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
_LEAF_TO_TORCH = {("params", "kernel"): "weight", ("params", "scale"): "weight",
                  ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict:
  """The module's variables as unboxed ShapeDtypeStructs (traced once: no FLOPs, ~2 s)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(InceptionV3().init, jax.random.key(0), x))


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  return ".".join(path[:-1] + (_LEAF_TO_TORCH[(collection, path[-1])],))


def _canonical_key(key: str) -> str:
  for prefix, name in _WRAPPER_NAMES.items():
    if key.startswith(prefix + "."):
      return name + key[len(prefix):]
  return key


def state_dict_to_variables(state_dict: Mapping[str, Any], source: str = "state dict") -> dict:
  """A pytorch-fid Inception state dict (NumPy or torch tensors) -> medjax variables.

  Every missing, unexpected or mis-shaped tensor is reported in one MedjaxError.
  """
  sd = {}
  for key, value in state_dict.items():
    key = _canonical_key(key)
    if key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
      continue
    sd[key] = torch_to_numpy(value) if hasattr(value, "detach") else np.asarray(value)
  shapes = variable_shapes()
  out, missing, bad_shape, used = {}, [], [], set()
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(shapes[collection])
    converted = {}
    for path, target in flat.items():
      key = _torch_key(collection, path)
      if key not in sd:
        missing.append(key)
        continue
      used.add(key)
      value = sd[key]
      if path[-1] == "kernel" and value.ndim == 4:
        value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
      if value.shape != target.shape:
        bad_shape.append(f"{key}: {tuple(sd[key].shape)} (expected "
                         f"{_torch_shape(path, target.shape)})")
        continue
      converted[path] = np.asarray(value, np.float32)
    out[collection] = flax.traverse_util.unflatten_dict(converted)
  unexpected = sorted(set(sd) - used)
  raise_if_mismatched(source, "not a pytorch-fid Inception state dict", missing, unexpected,
                      bad_shape)
  return jax.device_put(out)  # one call: jnp.asarray compiles per leaf shape


def _torch_shape(path, shape):
  return tuple(shape[i] for i in (3, 2, 0, 1)) if path[-1] == "kernel" else tuple(shape)


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of `state_dict_to_variables` (fid_inception_v3 names, without `fc`)."""
  sd = {}
  for collection in ("params", "batch_stats"):
    for path, value in flax.traverse_util.flatten_dict(nn.unbox(variables[collection])).items():
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":
        value = np.transpose(value, (3, 2, 0, 1))  # HWIO -> OIHW
      sd[_torch_key(collection, path)] = np.ascontiguousarray(value)
  return sd


def read_state_dict(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A `.safetensors` file, or a torch pickle (`.pth`) when `allow_pickle` (weights_only)."""
  path = Path(path)
  if not path.is_file():
    raise MedjaxError(f"{path}: Inception weights file not found")
  if path.suffix == ".safetensors":
    return read_safetensors(path)
  sd = torch_load(path, allow_pickle=allow_pickle)
  if not isinstance(sd, Mapping):
    raise MedjaxError(f"{path}: expected a state dict, got {type(sd).__name__}")
  return {k: torch_to_numpy(v) for k, v in sd.items() if hasattr(v, "detach")}


def torch_hub_checkpoint() -> Path:
  """Where pytorch-fid (torch hub) keeps the file: $TORCH_HOME/hub/checkpoints/..."""
  torch_home = os.environ.get(
      "TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch"))
  return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints" / WEIGHTS_FILE


def find_weights() -> Path:
  """$MEDJAX_INCEPTION_WEIGHTS, else torch hub's cache; a MedjaxError that says how to get it."""
  env = os.environ.get(ENV_VAR)
  if env:
    if not Path(env).expanduser().is_file():
      raise MedjaxError(f"{ENV_VAR}={env}: file not found (expected pytorch-fid's {WEIGHTS_FILE} "
                        f"or its .safetensors conversion; download: {WEIGHTS_URL})")
    return Path(env).expanduser()
  hub = torch_hub_checkpoint()
  if hub.is_file():
    return hub
  raise MedjaxError(
      f"FID Inception weights not found: {WEIGHTS_FILE} is neither at ${ENV_VAR} (unset) nor "
      f"where pytorch-fid keeps it ({hub}); medjax does not download. Fetch {WEIGHTS_URL} "
      f"yourself and put it there or point ${ENV_VAR} at it")


def load_inception(path=None, allow_pickle: bool = False) -> dict:
  """pytorch-fid's FID Inception weights as medjax variables (`{'params', 'batch_stats'}`).

  `path=None` looks at $MEDJAX_INCEPTION_WEIGHTS, then at torch hub's cache. A `.pth` is only
  read with `allow_pickle=True` (torch.load(weights_only=True)); `.safetensors` always.
  """
  path = Path(path) if path is not None else find_weights()
  return state_dict_to_variables(read_state_dict(path, allow_pickle), source=str(path))


def random_inception(seed: int = 0) -> dict:
  """Seeded random variables (He-normal convs, identity BatchNorm) for tests and the embedded model.

  Drawn with NumPy from the module's shapes (no network run). Features and distances are
  deterministic but not meaningful as absolute FID/KID values, nor comparable with published
  numbers; use `load_inception` for those.
  """
  rng = np.random.default_rng(seed)
  shapes = variable_shapes()

  def draw(path, s):
    leaf = path[-1].key
    if leaf == "kernel":  # HWIO: fan_in = H * W * I
      std = np.float32(np.sqrt(2 / np.prod(s.shape[:3])))
      return rng.standard_normal(s.shape, np.float32) * std
    fill = np.ones if leaf in ("scale", "var") else np.zeros
    return fill(s.shape, np.float32)

  return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def main(argv=None) -> int:
  """python -m medjax.eval.inception_weights IN.pth OUT.safetensors: a pickle-free copy, once."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print(f"usage: python -m medjax.eval.inception_weights {WEIGHTS_FILE} OUT.safetensors",
          file=sys.stderr)
    return 2
  try:
    variables = load_inception(argv[0], allow_pickle=True)
    write_safetensors(variables_to_state_dict(variables), argv[1],
                      metadata={"source": Path(argv[0]).name})
  except MedjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
