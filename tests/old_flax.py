"""A diffusers pipeline folder rewritten as FlaxStableDiffusionPipeline.save_pretrained wrote it.

diffusers dropped Flax, so no library can write these files any more; this module writes them
by the rules of diffusers 0.2x (`models/modeling_flax_pytorch_utils.py`:
`convert_pytorch_state_dict_to_flax`, which its Flax pipelines used on PyTorch weights) and
transformers' PyTorch -> Flax conversion, for the module names of diffusers' Flax code:

* `rename_key`: `name.<i>` -> `name_<i>` (`down_blocks_0`, `resnets_1`, `to_out_0`, `net_2`);
* the U-Net's attention keeps `to_q`/`to_k`/`to_v`/`to_out_0` (`attention_flax.FlaxAttention`
  names its Dense layers so), while the VAE's mid-block attention (`vae_flax.FlaxAttentionBlock`)
  has `query`/`key`/`value`/`proj_attn`;
* norm weights -> `scale`, embeddings -> `embedding`, conv kernels OIHW -> HWIO, linear
  kernels transposed;
* transformers' FlaxCLIPTextModel: `text_model/encoder/layers/<i>/...` (layers named `str(i)`).

Each component is `flax.serialization.to_bytes(params)` in `diffusion_flax_model.msgpack`
(`flax_model.msgpack` for the text encoder), with Flax class names in model_index.json and the
configs, as FlaxStableDiffusionPipeline saved them.
"""
import json
import re
import shutil
from pathlib import Path

import flax
import numpy as np

from medjax.convert import diffusers as diffusers_io
from medjax.convert.weights import read_component_weights

_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_EMBEDDINGS = ("token_embedding", "position_embedding")

MODEL_INDEX = {
    "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": "0.20.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "FlaxStableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "FlaxPNDMScheduler"],
    "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
}


def rename_key(key: str) -> str:
  """diffusers' `rename_key`: 'down_blocks.0.resnets.1' -> 'down_blocks_0.resnets_1'."""
  for pat in re.findall(r"\w+[.]\d+", key):
    key = key.replace(pat, "_".join(pat.split(".")))
  return key


def to_flax(key: tuple[str, ...], value: np.ndarray, component: str):
  """One PyTorch tensor -> (Flax path, array), by the rules in the module docstring."""
  module, leaf = key[:-1], key[-1]
  if component == "vae" and module and module[-1] in _VAE_ATTENTION:
    return module[:-1] + (_VAE_ATTENTION[module[-1]], "kernel" if leaf == "weight" else leaf), \
        (value.T if leaf == "weight" else value)
  if leaf == "bias":
    return key, value
  if module[-1] in _EMBEDDINGS:
    return module + ("embedding",), value
  if "norm" in module[-1] and value.ndim == 1:
    return module + ("scale",), value
  if value.ndim == 4:
    return module + ("kernel",), value.transpose(2, 3, 1, 0)
  return module + ("kernel",), value.T


def flax_params(state_dict: dict, component: str) -> dict:
  """A PyTorch state dict as the old Flax params tree of `component`."""
  flat = {}
  for key, value in state_dict.items():
    if key.endswith("position_ids"):
      continue
    parts = tuple(key.split(".")) if component == "text_encoder" else tuple(
        rename_key(key).split("."))
    path, array = to_flax(parts, np.asarray(value), component)
    flat[path] = np.ascontiguousarray(array)
  return flax.traverse_util.unflatten_dict(flat)


def write_flax_pipeline(src, out, *, dtype=None) -> dict:
  """Writes `src` (a diffusers folder) to `out` in the FlaxStableDiffusionPipeline layout;
  returns the params trees written (cast to `dtype` if given, e.g. bf16 as the `bf16` branch)."""
  src, out = Path(src), Path(out)
  out.mkdir(parents=True)
  (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
  shutil.copytree(src / "tokenizer", out / "tokenizer")
  (out / "scheduler").mkdir()
  scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
  scheduler["_class_name"] = "FlaxPNDMScheduler"
  (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
  trees = {}
  for name, (_, stems) in diffusers_io.COMPONENT_FILES.items():
    sd, _ = read_component_weights(src / name, stems)
    if name == "text_encoder":
      sd = diffusers_io.canonical_text_encoder_keys(sd)
    tree = flax_params(sd, name)
    if dtype is not None:
      tree = flax.traverse_util.unflatten_dict(
          {k: v.astype(dtype) for k, v in flax.traverse_util.flatten_dict(tree).items()})
    trees[name] = tree
    config = json.loads((src / name / "config.json").read_text())
    if name == "text_encoder":
      config["architectures"] = ["FlaxCLIPTextModel"]
    else:
      config["_class_name"] = "Flax" + config["_class_name"]
      if name == "unet":  # FlaxUNet2DConditionModel's execution fields, saved in its config
        config.update(use_memory_efficient_attention=False, split_head_dim=False)
    (out / name).mkdir()
    (out / name / "config.json").write_text(json.dumps(config, indent=2))
    (out / name / diffusers_io.FLAX_FILES[name]).write_bytes(flax.serialization.to_bytes(tree))
  return trees
