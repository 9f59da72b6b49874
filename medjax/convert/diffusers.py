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
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import numpy as np

from medjax.convert.weights import find_component_weights
from medjax.convert.weights import raise_if_mismatched
from medjax.convert.weights import read_component_weights
from medjax.convert.weights import read_flax_msgpack
from medjax.convert.weights import weight_variants
from medjax.convert.weights import write_safetensors
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


def flax_params_to_state_dict(flat: Mapping[tuple[str, ...], np.ndarray], *,
                              source: str) -> dict[str, np.ndarray]:
  """The old diffusers/transformers Flax params ({path: array}) as a PyTorch state dict.

  diffusers' Flax modules (before diffusers dropped Flax) named list children `name_<i>`
  (`down_blocks_0`, `resnets_1`, `to_out_0`, `net_2`), as medjax does, and the VAE's attention
  `query`/`key`/`value`/`proj_attn` (the names before diffusers 0.14, upgraded on import);
  transformers' FlaxCLIPTextModel named its layers `layers/<i>`. So the same path and layout
  rule as for medjax's own params applies.
  """
  out = {}
  for path, value in flat.items():
    try:
      key = flax_path_to_torch_key(tuple(str(p) for p in path))
    except ValueError as e:
      raise MedjaxError(f"{source}: not a Flax Stable Diffusion params tree ({e})") from None
    out[key] = flax_to_torch_array(path[-1], np.asarray(value))
  return out


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
      want = flax_to_torch_array(path[-1], np.zeros(target.shape, np.int8)).shape
      misshaped.append(f"{key}: got {tuple(state_dict[key].shape)}, expected {tuple(want)}")
      continue
    params[path] = np.asarray(value, dtype=dtype)
  unexpected = sorted(k for k in state_dict if k not in used and k.startswith(prefix)
                      and k[len(prefix):] not in IGNORED_KEYS and k not in IGNORED_KEYS)
  raise_if_mismatched(source, "weights do not match the model config", missing, unexpected,
                      misshaped)
  return flax.traverse_util.unflatten_dict(params)


def params_to_state_dict(params: Any, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict (names and layouts), the exact inverse of the import."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  return {flax_path_to_torch_key(path, prefix): np.ascontiguousarray(
              flax_to_torch_array(path[-1], np.asarray(value)).astype(dtype))
          for path, value in flat.items()}


# ---------------------------------------------------------------------------------------------
# Pipeline directories: model_index.json + one folder per component.

# component -> (expected diffusers/transformers class, weight file stems, config file name)
COMPONENT_FILES = {
    "unet": ("UNet2DConditionModel", ("diffusion_pytorch_model",)),
    "vae": ("AutoencoderKL", ("diffusion_pytorch_model",)),
    "text_encoder": ("CLIPTextModel", ("model", "pytorch_model")),
}

# The old Flax pipelines' weight files (FlaxStableDiffusionPipeline.save_pretrained).
FLAX_FILES = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
              "text_encoder": "flax_model.msgpack"}

# The tokenizer classes model_index.json may name (both read the same vocab.json + merges.txt).
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")


def read_json(path, what: str) -> dict:
  """Reads a JSON file, with an error naming the file and what it should have been."""
  path = Path(path)
  if not path.is_file():
    raise MedjaxError(f"{path}: missing ({what})")
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise MedjaxError(f"{path}: not valid JSON ({what}): {e}") from e
  if not isinstance(data, dict):
    raise MedjaxError(f"{path}: expected a JSON object ({what})")
  return data


def read_pipeline_index(path) -> dict:
  """Checks that `path` is a diffusers Stable Diffusion directory and returns model_index.json."""
  path = Path(path)
  if not path.exists():
    raise MedjaxError(f"{path}: does not exist (expected a diffusers pipeline directory)")
  if not path.is_dir():
    raise MedjaxError(f"{path}: is a file; expected a diffusers pipeline directory "
                      "(for a single-file checkpoint use StableDiffusion.from_single_file)")
  if not (path / "model_index.json").is_file():
    raise MedjaxError(f"{path}: not a diffusers pipeline directory (no model_index.json)")
  index = read_json(path / "model_index.json", "diffusers pipeline index")
  for name, (cls, _) in COMPONENT_FILES.items():
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2):
      raise MedjaxError(f"{path / 'model_index.json'}: no {name!r} component")
    if entry[1] not in (cls, "Flax" + cls):  # FlaxStableDiffusionPipeline's classes
      raise MedjaxError(f"{path / 'model_index.json'}: {name!r} is {entry[1]}, "
                        f"medjax supports {cls}")
  tokenizer = index.get("tokenizer")
  if isinstance(tokenizer, list) and len(tokenizer) == 2 and tokenizer[1] not in TOKENIZERS:
    raise MedjaxError(f"{path / 'model_index.json'}: 'tokenizer' is {tokenizer[1]}, medjax "
                      f"supports {' or '.join(TOKENIZERS)}")
  return index


def canonical_text_encoder_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Puts CLIP text-encoder keys under 'text_model.' (the SD checkpoint and medjax layout).

  transformers >= 5.6 flattened CLIPTextModel and saves 'embeddings.…' instead of
  'text_model.embeddings.…'; both load the same way.
  """
  out = {k if k.startswith("text_model.") or k == "text_projection.weight"
         else "text_model." + k: v for k, v in state_dict.items()}
  return {k: v for k, v in out.items() if k not in IGNORED_KEYS}


# Keys of diffusers' Flax model configs that choose how Flax ran, not what the model is.
FLAX_ONLY_KEYS = ("dtype", "use_memory_efficient_attention", "split_head_dim")


def read_component_config(path, name: str) -> dict:
  """A component's config.json; a Flax pipeline's (`FlaxUNet2DConditionModel`, ...) read as its
  PyTorch class's, without the Flax execution keys."""
  config = read_json(path, f"{name} config")
  cls = config.get("_class_name")
  if isinstance(cls, str) and cls.startswith("Flax"):
    config = {k: v for k, v in config.items() if k not in FLAX_ONLY_KEYS}
    config["_class_name"] = cls.removeprefix("Flax")
  return config


def read_scheduler_config(path) -> dict:
  """scheduler/scheduler_config.json; a Flax pipeline's (`FlaxPNDMScheduler`, maybe a `dtype`)
  read as its PyTorch class's."""
  config = read_json(path, "scheduler config")
  cls = config.get("_class_name")
  if isinstance(cls, str) and cls.startswith("Flax"):
    config = {k: v for k, v in config.items() if k != "dtype"}
    config["_class_name"] = cls.removeprefix("Flax")
  return config


def read_component_params(folder, name: str, param_shapes, variant: str | None = None,
                          dtype=np.float32) -> dict:
  """Reads one component's weights and converts them to params shaped like `param_shapes`.

  PyTorch weights (safetensors, then .bin) come first; a folder with none but the old Flax
  msgpack (`FLAX_FILES`) reads that.
  """
  folder, stems = Path(folder), COMPONENT_FILES[name][1]
  flax_file = folder / FLAX_FILES[name]
  if (flax_file.is_file() and not variant and find_component_weights(folder, stems) is None
      and not weight_variants(folder, stems)):
    state_dict = flax_params_to_state_dict(read_flax_msgpack(flax_file), source=str(flax_file))
    source = flax_file
  else:
    state_dict, source = read_component_weights(folder, stems, variant=variant,
                                                alternatives=f", or {FLAX_FILES[name]}")
  if name == "text_encoder":
    state_dict = canonical_text_encoder_keys(state_dict)
  return state_dict_to_params(state_dict, param_shapes, source=str(source), dtype=dtype)


def write_pipeline(out_dir, *, configs: Mapping[str, dict], params: Mapping[str, Any],
                   scheduler_config: dict, tokenizer_dir, dtype=np.float32) -> None:
  """Writes a diffusers StableDiffusionPipeline directory, atomically (temp dir, then rename).

  `configs` holds each component's config.json dict (unet, vae, text_encoder); `tokenizer_dir`
  a folder whose files are copied to `tokenizer/`.
  """
  out_dir = Path(out_dir)
  if out_dir.exists():
    raise MedjaxError(f"{out_dir}: already exists; refusing to overwrite")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  # A folder of the usual mode (mkdtemp's would stay 0700 after the rename).
  tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:12]}.tmp"
  tmp.mkdir()
  try:
    weight_names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                    "text_encoder": "model"}
    for name in COMPONENT_FILES:
      (tmp / name).mkdir()
      (tmp / name / "config.json").write_text(json.dumps(configs[name], indent=2, sort_keys=True))
      write_safetensors(params_to_state_dict(params[name], dtype=dtype),
                        tmp / name / f"{weight_names[name]}.safetensors",
                        metadata={"format": "pt"})
    shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2, sort_keys=True))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
