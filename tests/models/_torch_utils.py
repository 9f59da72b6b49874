"""PyTorch oracles for the model parity tests: seeded random diffusers models and their weights.

Every parameter is randomised (zero-initialised layers such as proj_out would otherwise hide
bugs), norms get non-trivial scales, and weights travel through a real `save_pretrained` folder,
so the test covers the file reader and the name map too.
"""
import json

import flax.linen as nn
import jax
import numpy as np
import torch

from medjax.convert.diffusers import state_dict_to_params
from medjax.convert.weights import read_component_weights

torch.set_num_threads(1)


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
  """Draws every parameter from N(0, std); norm scales from N(1, std)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      is_norm_scale = "norm" in name and name.endswith("weight") and p.ndim == 1
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return model.eval()


def save_and_read(model, folder):
  """save_pretrained -> (config.json dict, numpy state dict, weights path)."""
  model.save_pretrained(folder, safe_serialization=True)
  config = json.loads((folder / "config.json").read_text())
  state_dict, path = read_component_weights(folder, ("diffusion_pytorch_model",))
  return config, state_dict, path


def param_shapes(module, *args, boxed=False):
  """The module's param tree as ShapeDtypeStructs (no FLOPs), boxed or plain."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  return variables["params"] if boxed else nn.unbox(variables["params"])


def load_params(module, state_dict, source, *init_args):
  """Converts a diffusers state dict to `module`'s params through the shared name map."""
  return state_dict_to_params(state_dict, param_shapes(module, *init_args), source=str(source))


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def max_abs_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def rel_err(a, b) -> float:
  """||a - b|| / ||b||, the bf16 error measure."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))
