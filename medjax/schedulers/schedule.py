"""Schedule math every scheduler family shares, in NumPy, and the checking of config values.

Mirrors diffusers' float32 torch / NumPy code: betas are built like `torch.linspace` (float32
fused multiply-add) and `alphas_cumprod` like `torch.cumprod` (float64 accumulation), so the
per-step tables a family derives from them match diffusers bit for bit.
"""
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from medjax import validation
from medjax.errors import MedjaxError

# Constructor arguments (with diffusers' defaults) every supported class has.
BETA_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "trained_betas": None}

# Keys whose value cannot change the math given the other supported values: thresholding and
# flow-matching sigmas are not supported, so their tuning knobs are inert.
INERT_KEYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
                        "time_shift_type"})

_FALSE = validation.one_of(False)
_BETAS = validation.optional(validation.rule(
    lambda v: (isinstance(v, (list, tuple, np.ndarray))
               and all(validation.is_number(b) for b in v)), "a list of numbers"))

# Value rules of the keys several classes share; a family adds its own (prediction_type, ...).
SHARED_RULES: dict[str, validation.Rule] = {
    "num_train_timesteps": validation.int_at_least(2),
    "beta_start": validation.is_number,
    "beta_end": validation.is_number,
    "beta_schedule": validation.one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": _BETAS,
    "timestep_spacing": validation.one_of("leading", "trailing", "linspace"),
    "steps_offset": validation.int_at_least(0),
    "set_alpha_to_one": validation.is_bool,
    "clip_sample": validation.is_bool,
    "clip_sample_range": validation.positive_number,
    "rescale_betas_zero_snr": validation.is_bool,
    "thresholding": _FALSE,
    "skip_prk_steps": validation.is_bool,
    "interpolation_type": validation.one_of("linear"),
    "use_karras_sigmas": validation.is_bool,
    "use_exponential_sigmas": validation.is_bool,
    "use_beta_sigmas": _FALSE,
    "use_lu_lambdas": _FALSE,
    "use_flow_sigmas": _FALSE,
    "use_dynamic_shifting": _FALSE,
    "sigma_min": validation.optional(validation.positive_number),
    "sigma_max": validation.optional(validation.positive_number),
    "timestep_type": validation.one_of("discrete"),
    "final_sigmas_type": validation.one_of("zero", "sigma_min"),
    "solver_order": validation.one_of(1, 2, 3),
    "algorithm_type": validation.one_of("dpmsolver++"),
    "solver_type": validation.one_of("midpoint", "heun"),
    "lower_order_final": validation.is_bool,
    "euler_at_final": validation.is_bool,
    "lambda_min_clipped": validation.is_number,
}


def resolve(name: str, defaults: Mapping[str, Any], rules: Mapping[str, validation.Rule],
            config: Mapping[str, Any], known_keys) -> dict[str, Any]:
  """`defaults` updated with `config` after checking every key and value.

  Args:
    name: the medjax scheduler name (for error messages).
    defaults: the diffusers class's constructor arguments with their defaults.
    rules: the family's own value rules; SHARED_RULES cover the other keys.
    config: the scheduler config dict.
    known_keys: the keys of every supported class. A key of another class is dropped, exactly
      as diffusers' `from_config` drops it (so SD's PNDM config builds an Euler scheduler).

  Raises:
    MedjaxError naming the unknown keys or the first unsupported value.
  """
  validation.check_known_keys([k for k in config if not k.startswith("_")], known_keys,
                              "scheduler config")
  supported = {k: (validation.ANY if k in INERT_KEYS else rules.get(k, SHARED_RULES.get(k)))
               for k in defaults}
  out = {**defaults, **validation.check_config(
      config, supported, f"scheduler config (medjax {name!r} scheduler)",
      ignore=lambda key: key not in defaults)}
  if out["trained_betas"] is not None:
    out["trained_betas"] = tuple(float(b) for b in out["trained_betas"])
    if len(out["trained_betas"]) != out["num_train_timesteps"]:
      raise MedjaxError(f"scheduler config: 'trained_betas' has {len(out['trained_betas'])} "
                        f"values, expected num_train_timesteps = {out['num_train_timesteps']}")
  if out.get("use_karras_sigmas") and out.get("use_exponential_sigmas"):
    raise MedjaxError("scheduler config: 'use_karras_sigmas' and 'use_exponential_sigmas' are "
                      "both true; expected at most one")
  return out


# -- betas and alphas_cumprod ----------------------------------------------------------------------


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=float32)` bit for bit (its CPU kernel uses FMA)."""
  start, end = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start], np.float32)
  step = np.float64((end - start) / np.float32(steps - 1))
  idx = np.arange(steps)
  lo = (np.float64(start) + step * idx.astype(np.float32)).astype(np.float32)
  hi = (np.float64(end) - step * (steps - idx - 1).astype(np.float32)).astype(np.float32)
  return np.where(idx < steps // 2, lo, hi)


def cumprod(x: np.ndarray) -> np.ndarray:
  """`torch.cumprod` on float32: accumulates in float64, rounds each output."""
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Zero terminal SNR (arXiv:2305.08891, Algorithm 1), in diffusers' float32 op order."""
  one = np.float32(1)
  sqrt_ab = np.sqrt(cumprod(one - betas))
  s0, s_t = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
  sqrt_ab = (sqrt_ab - s_t) * (s0 / (s0 - s_t))
  ab = sqrt_ab ** 2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return one - alphas


def alphas_cumprod(config: Mapping[str, Any], sigma_space: bool) -> np.ndarray:
  """(num_train_timesteps,) float32 alpha-bar of a resolved config, read-only.

  `sigma_space`: the scheduler works in sigma space (Euler types, DPM-Solver), where diffusers
  keeps the last zero-SNR alpha-bar just above 0 so that sigma stays finite.
  """
  c = config
  t = c["num_train_timesteps"]
  if c["trained_betas"] is not None:
    betas = np.array(c["trained_betas"], np.float32)
  elif c["beta_schedule"] == "linear":
    betas = torch_linspace(c["beta_start"], c["beta_end"], t)
  elif c["beta_schedule"] == "scaled_linear":
    betas = torch_linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, t) ** 2
  else:
    betas = betas_for_alpha_bar(t)
  if c.get("rescale_betas_zero_snr"):
    betas = rescale_zero_terminal_snr(betas)
  acp = cumprod(np.float32(1) - betas)
  if c.get("rescale_betas_zero_snr") and sigma_space:
    acp[-1] = 2.0 ** -24
  acp.setflags(write=False)
  return acp


# -- timesteps -------------------------------------------------------------------------------------


def spaced_timesteps(spacing: str, num_train: int, n: int, offset: int) -> np.ndarray:
  """Descending float64 timesteps (linspace unrounded), as DDPM/DDIM/PNDM/Euler space them."""
  if spacing == "linspace":
    return np.linspace(0, num_train - 1, n)[::-1].copy()
  if spacing == "leading":
    return (np.arange(0, n) * (num_train // n)).round()[::-1] + offset
  return np.round(np.arange(num_train, 0, -num_train / n)) - 1  # trailing


def start_index_for_strength(num_inference_steps: int, strength: float) -> int:
  """diffusers img2img's first step for `strength` in [0, 1] (1 = start from pure noise)."""
  if not 0 <= strength <= 1:
    raise MedjaxError(f"img2img strength = {strength!r}; expected a number in [0, 1]")
  init = min(int(num_inference_steps * strength), num_inference_steps)
  return max(num_inference_steps - init, 0)


# -- sigmas ----------------------------------------------------------------------------------------


def train_sigmas(acp: np.ndarray) -> np.ndarray:
  """sqrt((1 - alpha-bar) / alpha-bar) at every training timestep, float32."""
  return ((np.float32(1) - acp) / acp) ** np.float32(0.5)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep of each sigma (interpolation in log sigma), as diffusers."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def convert_sigmas(config: Mapping[str, Any], in_sigmas: np.ndarray, n: int) -> np.ndarray:
  """Karras / exponential sigma spacing (diffusers' _convert_to_karras / _exponential)."""
  c = config
  sigma_min = c.get("sigma_min") if c.get("sigma_min") is not None else float(in_sigmas[-1])
  sigma_max = c.get("sigma_max") if c.get("sigma_max") is not None else float(in_sigmas[0])
  if c["use_karras_sigmas"]:
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
  return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def final_sigma(config: Mapping[str, Any], acp: np.ndarray) -> float:
  """The sigma after the last step: 0, or the smallest training sigma ('sigma_min')."""
  if config.get("final_sigmas_type", "zero") == "zero":
    return 0.0
  acp0 = acp[0]
  return float(((np.float32(1) - acp0) / acp0) ** np.float32(0.5))
