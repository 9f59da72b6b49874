"""Diffusion schedulers in pure JAX that reproduce diffusers 0.42 step for step.

A `Scheduler` is a frozen, hashable description of one diffusers scheduler config, so it can be
closed over (or passed as a static argument) by jitted code. Everything that depends only on the
number of inference steps (timesteps, sigmas, alphas per step, which solver order each step may
use) is computed in NumPy by `set_timesteps`, mirroring diffusers' own NumPy code, and stored as
arrays in a `SchedulerState`. `step` is then pure jnp on gathered per-step values and the state's
history buffers, so a sampling loop is one `lax.scan` whose compiled program depends only on the
number of steps and the latent shape, never on prompts, seeds or step values:

  sch = make_scheduler(None, sd.scheduler_config)             # or 'euler', 'dpmsolver++', ...
  state = sch.set_timesteps(50, sample_shape=latents.shape)
  latents = latents * sch.init_noise_sigma(state)

  def body(carry, i):
    x, st = carry
    eps = unet(sch.scale_model_input(st, x, i), st.timesteps[i], ...)
    x, st = sch.step(st, eps, i, x, key=jax.random.fold_in(key, i))
    return (x, st), None

  (latents, _), _ = jax.lax.scan(body, (latents, state), jnp.arange(state.num_steps))

img2img / inpainting start part-way: `set_timesteps(n, start_index=k)` keeps the steps from `k`
on (as diffusers' `set_begin_index(k)` with the pipeline's `timesteps[k:]`), with a fresh step
counter and history; `start_index_for_strength(n, strength)` gives diffusers' `k`, and
`add_noise_at(state, image_latents, noise)` noises the image to that first step.

Numerics follow diffusers exactly where it matters: betas are built like `torch.linspace`
(float32 fused multiply-add) and `alphas_cumprod` like `torch.cumprod` (float64 accumulation), and
the per-step math uses the same float32 operations in the same order. `step` computes in float32
and returns `sample.dtype`.

Not implemented (a MedjaxError names the key): dynamic thresholding, learned DDPM variances,
DPM-Solver algorithms other than 'dpmsolver++' (SDE, 'dpmsolver'), beta / Lu-lambda / flow
sigmas, Euler's 'log_linear' interpolation and 'continuous' timesteps. Also absent: Euler's
s_churn step arguments and custom timestep / sigma lists in `set_timesteps`.
"""
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxError

# diffusers class name -> medjax scheduler name.
CLASS_NAMES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmsolver++",
}
NAMES = tuple(CLASS_NAMES.values())

_BETA_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                  "beta_schedule": "linear", "trained_betas": None}

# Every constructor argument of each diffusers class with its default (the config keys it reads).
# A test checks this table against the diffusers signatures.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {**_BETA_DEFAULTS, "variance_type": "fixed_small", "clip_sample": True,
             "prediction_type": "epsilon", "thresholding": False,
             "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
             "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
             "rescale_betas_zero_snr": False},
    "ddim": {**_BETA_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
             "prediction_type": "epsilon", "thresholding": False,
             "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
             "sample_max_value": 1.0, "timestep_spacing": "leading",
             "rescale_betas_zero_snr": False},
    "pndm": {**_BETA_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
             "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0},
    "euler": {**_BETA_DEFAULTS, "prediction_type": "epsilon", "interpolation_type": "linear",
              "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
              "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0,
              "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "euler_ancestral": {**_BETA_DEFAULTS, "prediction_type": "epsilon",
                        "timestep_spacing": "linspace", "steps_offset": 0,
                        "rescale_betas_zero_snr": False},
    "dpmsolver++": {**_BETA_DEFAULTS, "solver_order": 2, "prediction_type": "epsilon",
                    "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                    "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
                    "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
                    "use_karras_sigmas": False, "use_exponential_sigmas": False,
                    "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                    "flow_shift": 1.0, "final_sigmas_type": "zero",
                    "lambda_min_clipped": -math.inf, "variance_type": None,
                    "timestep_spacing": "linspace", "steps_offset": 0,
                    "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
                    "time_shift_type": "exponential"},
}

# Keys any of the six classes reads. A key of another class is dropped, exactly as diffusers'
# `from_config` drops it (so SD's PNDM config, with `skip_prk_steps`, builds an Euler scheduler).
KNOWN_KEYS = frozenset(k for d in DEFAULTS.values() for k in d)

# Keys whose value cannot change the math given the other supported values: thresholding and
# flow-matching sigmas are not supported, so their tuning knobs are inert.
INERT_KEYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
                        "time_shift_type"})


def _is_bool(v):
  return isinstance(v, bool)


def _is_number(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v, lo):
  return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _one_of(*values) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: any(type(v) is type(x) and v == x for x in values),
          "one of " + ", ".join(repr(x) for x in values))


_BOOL = (_is_bool, "true or false")
_NUMBER = (_is_number, "a number")
_FALSE = _one_of(False)
_PREDICTION = {
    "ddpm": _one_of("epsilon", "v_prediction", "sample"),
    "ddim": _one_of("epsilon", "v_prediction", "sample"),
    "pndm": _one_of("epsilon", "v_prediction"),
    "euler": _one_of("epsilon", "v_prediction", "sample", "original_sample"),
    "euler_ancestral": _one_of("epsilon", "v_prediction"),
    "dpmsolver++": _one_of("epsilon", "v_prediction", "sample"),
}
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_train_timesteps": (lambda v: _is_int(v, 2), "an integer >= 2"),
    "beta_start": _NUMBER,
    "beta_end": _NUMBER,
    "beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": (lambda v: v is None or (isinstance(v, (list, tuple, np.ndarray))
                                             and all(_is_number(b) or isinstance(b, np.floating)
                                                     for b in v)),
                      "null or a list of numbers"),
    "timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "steps_offset": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "set_alpha_to_one": _BOOL,
    "clip_sample": _BOOL,
    "clip_sample_range": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "rescale_betas_zero_snr": _BOOL,
    "thresholding": _FALSE,
    "skip_prk_steps": _BOOL,
    "interpolation_type": _one_of("linear"),
    "use_karras_sigmas": _BOOL,
    "use_exponential_sigmas": _BOOL,
    "use_beta_sigmas": _FALSE,
    "use_lu_lambdas": _FALSE,
    "use_flow_sigmas": _FALSE,
    "use_dynamic_shifting": _FALSE,
    "sigma_min": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive number"),
    "sigma_max": (lambda v: v is None or (_is_number(v) and v > 0), "null or a positive number"),
    "timestep_type": _one_of("discrete"),
    "final_sigmas_type": _one_of("zero", "sigma_min"),
    "solver_order": _one_of(1, 2, 3),
    "algorithm_type": _one_of("dpmsolver++"),
    "solver_type": _one_of("midpoint", "heun"),
    "lower_order_final": _BOOL,
    "euler_at_final": _BOOL,
    "lambda_min_clipped": _NUMBER,
}
_VARIANCE_TYPE = {"ddpm": _one_of("fixed_small", "fixed_small_log", "fixed_large"),
                  "dpmsolver++": _one_of(None)}


def _rule(name: str, key: str):
  if key == "prediction_type":
    return _PREDICTION[name]
  if key == "variance_type":
    return _VARIANCE_TYPE[name]
  return _RULES[key]


def resolve_config(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers class defaults updated with `config`, after checking every key and value.

  Raises:
    MedjaxError naming the first unknown key or unsupported value.
  """
  out = dict(DEFAULTS[name])
  for key, value in config.items():
    if key.startswith("_"):
      continue
    if key not in KNOWN_KEYS:
      raise MedjaxError(f"scheduler config: unknown key {key!r} (= {value!r}); medjax knows the "
                        f"options of the diffusers classes {', '.join(CLASS_NAMES)}")
    if key not in out:
      continue  # another class's option: diffusers' from_config ignores it too
    if key not in INERT_KEYS:
      ok, expected = _rule(name, key)
      if not ok(value):
        raise MedjaxError(f"scheduler config: {key!r} = {value!r} is not supported by the "
                          f"medjax {name!r} scheduler (expected {expected})")
    out[key] = value
  if out["trained_betas"] is not None:
    out["trained_betas"] = tuple(float(b) for b in out["trained_betas"])
    if len(out["trained_betas"]) != out["num_train_timesteps"]:
      raise MedjaxError(f"scheduler config: 'trained_betas' has {len(out['trained_betas'])} "
                        f"values, expected num_train_timesteps = {out['num_train_timesteps']}")
  if out.get("use_karras_sigmas") and out.get("use_exponential_sigmas"):
    raise MedjaxError("scheduler config: 'use_karras_sigmas' and 'use_exponential_sigmas' are "
                      "both true; expected at most one")
  return out


# -- NumPy schedule construction (mirrors diffusers' float32 torch / NumPy code) ------------------


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=float32)` bit for bit (its CPU kernel uses FMA)."""
  start, end = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start], np.float32)
  step = np.float64((end - start) / np.float32(steps - 1))
  idx = np.arange(steps)
  lo = (np.float64(start) + step * idx.astype(np.float32)).astype(np.float32)
  hi = (np.float64(end) - step * (steps - idx - 1).astype(np.float32)).astype(np.float32)
  return np.where(idx < steps // 2, lo, hi)


def _cumprod(x: np.ndarray) -> np.ndarray:
  """`torch.cumprod` on float32: accumulates in float64, rounds each output."""
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Zero terminal SNR (arXiv:2305.08891, Algorithm 1), in diffusers' float32 op order."""
  one = np.float32(1)
  sqrt_ab = np.sqrt(_cumprod(one - betas))
  s0, s_t = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
  sqrt_ab = (sqrt_ab - s_t) * (s0 / (s0 - s_t))
  ab = sqrt_ab ** 2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return one - alphas


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep of each sigma (interpolation in log sigma), as diffusers."""
  sigma = np.asarray(sigma)
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, np.newaxis]
  low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
  high_idx = low_idx + 1
  low, high = log_sigmas[low_idx], log_sigmas[high_idx]
  w = np.clip((low - log_sigma) / (low - high), 0, 1)
  return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _spaced_timesteps(spacing: str, num_train: int, n: int, offset: int) -> np.ndarray:
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


# -- state -----------------------------------------------------------------------------------------


@flax.struct.dataclass
class SchedulerState:
  """Everything `step` needs besides the static config; a pytree of arrays (a `lax.scan` carry).

  Attributes:
    timesteps: (n,) the model's timestep input at each step (int32; float32 for Euler types).
    schedule: per-step coefficient arrays computed at `set_timesteps` (names per scheduler).
    buffers: multistep history (PNDM 'ets', 'cur_sample', ...; DPM-Solver 'model_outputs').
    counter: int32 scalar, steps taken since `set_timesteps` (diffusers' `counter` /
      `lower_order_nums`: history-dependent choices read it, not the step index).
  """
  timesteps: jax.Array
  schedule: dict
  buffers: dict
  counter: jax.Array

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def _expand(c: jax.Array, x: jax.Array) -> jax.Array:
  """Per-sample coefficients (B,) or () -> broadcastable over x's trailing axes, as diffusers."""
  c = jnp.reshape(c, (-1,))
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - 1))


# -- the scheduler ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """One diffusers scheduler config, hashable (static under jit); methods are pure functions.

  Attributes:
    name: one of NAMES.
    options: the resolved config (class defaults + given keys) as sorted (key, value) pairs.
    eta: DDIM's eta (0 = deterministic DDIM; > 0 adds noise and needs a key); DDIM only.
  """
  name: str
  options: tuple[tuple[str, Any], ...]
  eta: float = 0.0

  @functools.cached_property
  def config(self) -> dict[str, Any]:
    return dict(self.options)

  @property
  def num_train_timesteps(self) -> int:
    return self.config["num_train_timesteps"]

  @property
  def prediction_type(self) -> str:
    return self.config["prediction_type"]

  @property
  def is_stochastic(self) -> bool:
    """Whether `step` draws noise (then it needs `key` or `noise`)."""
    return self.name in ("ddpm", "euler_ancestral") or (self.name == "ddim" and self.eta > 0)

  @functools.cached_property
  def _alphas_cumprod(self) -> np.ndarray:
    c = self.config
    t = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
      betas = np.array(c["trained_betas"], np.float32)
    elif c["beta_schedule"] == "linear":
      betas = _torch_linspace(c["beta_start"], c["beta_end"], t)
    elif c["beta_schedule"] == "scaled_linear":
      betas = _torch_linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, t) ** 2
    else:
      betas = _betas_for_alpha_bar(t)
    if c.get("rescale_betas_zero_snr"):
      betas = _rescale_zero_terminal_snr(betas)
    acp = _cumprod(np.float32(1) - betas)
    if c.get("rescale_betas_zero_snr") and self.name in ("euler", "euler_ancestral",
                                                         "dpmsolver++"):
      acp[-1] = 2.0 ** -24  # diffusers keeps sigma finite for the sigma-space schedulers
    acp.setflags(write=False)
    return acp

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """(num_train_timesteps,) float32 alpha-bar; for training losses (e.g. min-SNR weights)."""
    return self._alphas_cumprod

  # -- set_timesteps -----------------------------------------------------------------------------

  def set_timesteps(self, num_inference_steps: int, *,
                    sample_shape: Sequence[int] | None = None,
                    start_index: int = 0) -> SchedulerState:
    """The state for a run of `num_inference_steps` (NumPy, static shapes).

    Args:
      num_inference_steps: as diffusers' `set_timesteps`; PNDM with `skip_prk_steps` runs one
        step more (its second step re-evaluates the first), PRK mode 8 more; use
        `state.num_steps`.
      sample_shape: the latent shape; required by the multistep schedulers ('pndm',
        'dpmsolver++') to size their history buffers.
      start_index: first step kept (img2img); see `start_index_for_strength`.
    """
    n = num_inference_steps
    t_train = self.num_train_timesteps
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= t_train:
      raise MedjaxError(f"num_inference_steps = {n!r}; expected an integer in "
                        f"[1, num_train_timesteps = {t_train}]")
    n = int(n)
    timesteps, schedule, per_step = getattr(self, "_schedule_" + self.name.replace("+", "p"))(n)
    if not 0 <= start_index < len(timesteps) or isinstance(start_index, bool):
      raise MedjaxError(f"start_index = {start_index!r}; expected an integer in "
                        f"[0, {len(timesteps)})")
    if start_index and self.name == "pndm" and not self.config["skip_prk_steps"]:
      raise MedjaxError("start_index > 0 needs 'skip_prk_steps': true for the 'pndm' scheduler "
                        "(its Runge-Kutta warm-up must start at step 0)")
    sched = {k: jnp.asarray(v[start_index:] if k in per_step else v)
             for k, v in schedule.items()}
    buffers = {}
    if self.name in ("pndm", "dpmsolver++"):
      if sample_shape is None:
        raise MedjaxError(f"set_timesteps: the {self.name!r} scheduler needs sample_shape "
                          "(the latent shape) for its history buffers")
      shape = tuple(int(d) for d in sample_shape)
      if self.name == "pndm":
        buffers = {"ets": np.zeros((4,) + shape, np.float32), "num_ets": np.int32(0),
                   "cur_sample": np.zeros(shape, np.float32),
                   "prk_sum": np.zeros(shape, np.float32)}
      else:
        buffers = {"model_outputs": np.zeros((self.config["solver_order"],) + shape,
                                             np.float32)}
    ts_dtype = np.float32 if self.name in ("euler", "euler_ancestral") else np.int32
    # NumPy -> device transfers only: no op is compiled before the sampling loop.
    return SchedulerState(timesteps=jnp.asarray(timesteps[start_index:].astype(ts_dtype)),
                          schedule=sched, buffers=jax.tree.map(jnp.asarray, buffers),
                          counter=jnp.asarray(np.int32(0)))

  def _alpha_at(self, t: np.ndarray, final: float) -> np.ndarray:
    acp = self.alphas_cumprod
    return np.where(t >= 0, acp[np.clip(t, 0, len(acp) - 1)], np.float32(final)).astype(
        np.float32)

  def _final_alpha(self) -> float:
    return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

  def _int_timesteps(self, n):
    c = self.config
    return _spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                             c["steps_offset"]).round().astype(np.int64)

  def _schedule_ddpm(self, n):
    ts = self._int_timesteps(n)
    first = np.array([np.nonzero(ts == t)[0][0] for t in ts])  # diffusers' previous_timestep
    prev = np.where(first == len(ts) - 1, -1, ts[np.minimum(first + 1, len(ts) - 1)])
    sched = {"alpha_t": self._alpha_at(ts, 1.0), "alpha_prev": self._alpha_at(prev, 1.0),
             "has_noise": ts > 0}
    return ts, sched, set(sched)

  def _schedule_ddim(self, n):
    ts = self._int_timesteps(n)
    prev = ts - self.num_train_timesteps // n
    sched = {"alpha_t": self._alpha_at(ts, 1.0),
             "alpha_prev": self._alpha_at(prev, self._final_alpha())}
    return ts, sched, set(sched)

  def _schedule_pndm(self, n):
    c = self.config
    t_train = c["num_train_timesteps"]
    ratio = t_train // n
    asc = self._int_timesteps(n)[::-1]
    final = self._final_alpha()
    if c["skip_prk_steps"]:
      ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].copy()
      t_eff, t_prev = ts, ts - ratio
      num_prk = 0
    else:
      if n < 4:
        raise MedjaxError(f"num_inference_steps = {n} with 'skip_prk_steps': false; the PNDM "
                          "Runge-Kutta warm-up needs at least 4 steps")
      prk = asc[-4:].repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
      prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
      plms = asc[:-3][::-1].copy()
      ts = np.concatenate([prk, plms])
      num_prk = len(prk)
      c_idx = np.arange(num_prk)
      prk_eff = prk[c_idx // 4 * 4]
      prk_prev = prk - np.where(c_idx % 2 == 1, 0, ratio // 2)
      t_eff = np.concatenate([prk_eff, plms])
      t_prev = np.concatenate([prk_prev, plms - ratio])
    sched = {"alpha_t": self._alpha_at(t_eff, final), "alpha_prev": self._alpha_at(t_prev, final),
             # PLMS's second step re-runs the first one: from t + ratio down to t.
             "alpha_next": self._alpha_at(np.minimum(ts + ratio, t_train - 1), final)}
    return ts, {**sched, "num_prk": np.int32(num_prk)}, set(sched)

  def _train_sigmas(self):
    acp = self.alphas_cumprod
    return ((np.float32(1) - acp) / acp) ** np.float32(0.5)

  def _convert_sigmas(self, in_sigmas, n):
    """Karras / exponential sigma spacing (diffusers' _convert_to_karras / _exponential)."""
    c = self.config
    sigma_min = c.get("sigma_min") if c.get("sigma_min") is not None else float(in_sigmas[-1])
    sigma_max = c.get("sigma_max") if c.get("sigma_max") is not None else float(in_sigmas[0])
    if c["use_karras_sigmas"]:
      rho = 7.0
      ramp = np.linspace(0, 1, n)
      min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
      return (max_inv + ramp * (min_inv - max_inv)) ** rho
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))

  def _final_sigma(self):
    if self.config.get("final_sigmas_type", "zero") == "zero":
      return 0.0
    acp0 = self.alphas_cumprod[0]
    return float(((np.float32(1) - acp0) / acp0) ** np.float32(0.5))

  def _init_noise_sigma(self, sigmas):
    max_sigma = sigmas.max()
    if self.config["timestep_spacing"] in ("linspace", "trailing"):
      return np.float32(max_sigma)
    return np.float32((max_sigma ** 2 + np.float32(1)) ** np.float32(0.5))

  def _schedule_euler(self, n):
    c = self.config
    ts = _spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                           c["steps_offset"]).astype(np.float32)
    train = self._train_sigmas()
    sigmas = np.interp(ts, np.arange(0, len(train)), train)
    if c.get("use_karras_sigmas") or c.get("use_exponential_sigmas"):
      sigmas = self._convert_sigmas(sigmas, n)
      ts = _sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
    sched = {"sigmas": sigmas, "init_noise_sigma": self._init_noise_sigma(sigmas)}
    return ts, sched, {"sigmas"}

  _schedule_euler_ancestral = _schedule_euler

  def _schedule_dpmsolverpp(self, n):
    c = self.config
    t_train = c["num_train_timesteps"]
    acp = self.alphas_cumprod
    lambda_t = np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1) - acp))
    clipped = np.searchsorted(lambda_t[::-1], np.float32(c["lambda_min_clipped"]), side="left")
    last = t_train - int(clipped)
    spacing = c["timestep_spacing"]
    if spacing == "linspace":
      ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
      ts = ((np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
            + c["steps_offset"])
    else:
      ts = np.arange(last, 0, -t_train / n).round().astype(np.int64) - 1
    train = self._train_sigmas()
    if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
      sigmas = self._convert_sigmas(train[::-1].copy(), n)
      ts = _sigma_to_t(sigmas, np.log(train))
      if c["use_karras_sigmas"] and c["beta_schedule"] != "squaredcos_cap_v2":
        ts = ts.round()
      ts = ts.astype(np.int64)
    else:
      sigmas = np.interp(ts, np.arange(0, len(train)), train)
    sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
    # Highest solver order each step may use (diffusers' lower_order_final / _second).
    num = len(ts)
    cap = np.full(num, c["solver_order"], np.int32)
    short = c["lower_order_final"] and num < 15
    if num >= 2 and short:
      cap[-2] = min(cap[-2], 2)
    if c["euler_at_final"] or short or c["final_sigmas_type"] == "zero":
      cap[-1] = 1
    return ts, {"sigmas": sigmas, "order_cap": cap}, {"sigmas", "order_cap"}

  # -- per-step functions (jnp; step_index may be traced) -----------------------------------------

  def init_noise_sigma(self, state: SchedulerState) -> jax.Array:
    """Scale of the initial noise (1 except for Euler types), as diffusers' init_noise_sigma."""
    return state.schedule.get("init_noise_sigma", jnp.ones((), jnp.float32))

  def scale_model_input(self, state: SchedulerState, sample: jax.Array,
                        step_index) -> jax.Array:
    """The model's input at `step_index`: sample / sqrt(sigma^2 + 1) for Euler types."""
    if self.name not in ("euler", "euler_ancestral"):
      return sample
    sigma = state.schedule["sigmas"][step_index]
    return (sample.astype(jnp.float32) / (sigma ** 2 + 1) ** 0.5).astype(sample.dtype)

  def step(self, state: SchedulerState, model_output: jax.Array, step_index, sample: jax.Array,
           key: jax.Array | None = None, *,
           noise: jax.Array | None = None) -> tuple[jax.Array, SchedulerState]:
    """One denoising step from `state.timesteps[step_index]` to the next.

    Args:
      state: from `set_timesteps` or the previous `step`.
      model_output: the model's prediction (config's prediction_type) for `sample`.
      step_index: position in `state.timesteps` (a Python int or a traced int32); steps must be
        taken in order from 0, as with diffusers.
      sample: the current latents.
      key: PRNG key for the noise of 'ddpm', 'euler_ancestral' and DDIM with eta > 0; use a new
        key each step (e.g. `jax.random.fold_in(key, step_index)`).
      noise: explicit standard-normal noise instead of `key` (tests inject diffusers' noise).

    Returns:
      (the previous, less noisy sample in sample.dtype, the new state).
    """
    i = jnp.asarray(step_index, jnp.int32)
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    if self.is_stochastic and noise is None:
      if key is None:
        raise MedjaxError(f"step: the {self.name!r} scheduler draws noise; pass key= (or noise=)")
      noise = jax.random.normal(key, sample.shape, jnp.float32)
    if noise is not None:
      noise = noise.astype(jnp.float32)
    fn = getattr(self, "_step_" + self.name.replace("+", "p"))
    prev, buffers = fn(state, out, i, x, noise)
    new_state = state.replace(buffers=buffers, counter=state.counter + 1)
    return prev.astype(sample.dtype), new_state

  def _x0_eps(self, x, out, a_t):
    """(pred_original_sample, pred_epsilon) for DDPM/DDIM's alpha parametrisation."""
    beta_t = 1 - a_t
    pt = self.prediction_type
    if pt == "epsilon":
      return (x - beta_t ** 0.5 * out) / a_t ** 0.5, out
    if pt == "sample":
      return out, (x - a_t ** 0.5 * out) / beta_t ** 0.5
    return a_t ** 0.5 * x - beta_t ** 0.5 * out, a_t ** 0.5 * out + beta_t ** 0.5 * x

  def _clip(self, x0):
    if self.config["clip_sample"]:
      r = self.config["clip_sample_range"]
      return jnp.clip(x0, -r, r)
    return x0

  def _step_ddpm(self, state, out, i, x, noise):
    a_t = state.schedule["alpha_t"][i]
    a_prev = state.schedule["alpha_prev"][i]
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0 = self._clip(self._x0_eps(x, out, a_t)[0])
    x0_coeff = (a_prev ** 0.5 * cur_beta) / beta_t
    x_coeff = cur_alpha ** 0.5 * beta_prev / beta_t
    prev = x0_coeff * x0 + x_coeff * x
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * cur_beta, 1e-20)
    vt = self.config["variance_type"]
    if vt == "fixed_small":
      std = variance ** 0.5
    elif vt == "fixed_small_log":
      std = jnp.exp(0.5 * jnp.log(variance))
    else:  # fixed_large
      std = cur_beta ** 0.5
    prev = jnp.where(state.schedule["has_noise"][i], prev + std * noise, prev)
    return prev, state.buffers

  def _step_ddim(self, state, out, i, x, noise):
    a_t = state.schedule["alpha_t"][i]
    a_prev = state.schedule["alpha_prev"][i]
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    x0, eps = self._x0_eps(x, out, a_t)
    x0 = self._clip(x0)
    variance = (beta_prev / beta_t) * (1 - a_t / a_prev)
    std = self.eta * variance ** 0.5
    direction = (1 - a_prev - std ** 2) ** 0.5 * eps
    prev = a_prev ** 0.5 * x0 + direction
    if self.eta > 0:
      prev = prev + std * noise
    return prev, state.buffers

  def _step_pndm(self, state, out, i, x, noise):
    del noise
    s, b = state.schedule, state.buffers
    c = state.counter
    a_t, a_prev, a_next = s["alpha_t"][i], s["alpha_prev"][i], s["alpha_next"][i]
    ets, num_ets, cur_sample, prk_sum = b["ets"], b["num_ets"], b["cur_sample"], b["prk_sum"]
    v_pred = self.prediction_type == "v_prediction"

    def prev_sample(x, a_t, a_prev, eps):
      beta_t, beta_prev = 1 - a_t, 1 - a_prev
      if v_pred:
        eps = a_t ** 0.5 * eps + beta_t ** 0.5 * x
      sample_coeff = (a_prev / a_t) ** 0.5
      denom = a_t * beta_prev ** 0.5 + (a_t * beta_t * a_prev) ** 0.5
      return sample_coeff * x - (a_prev - a_t) * eps / denom

    def push(ets):
      return jnp.concatenate([ets[1:], out[None]]), jnp.minimum(num_ets + 1, 4)

    def buffers(ets=ets, num_ets=num_ets, cur_sample=cur_sample, prk_sum=prk_sum):
      return {"ets": ets, "num_ets": num_ets, "cur_sample": cur_sample, "prk_sum": prk_sum}

    def plms_first():  # counter 0: Euler step, remember the sample for the re-run
      e, n = push(ets)
      return prev_sample(x, a_t, a_prev, out), buffers(e, n, cur_sample=x)

    def plms_rerun():  # counter 1: redo the first step with the mean of both predictions
      eps = (out + ets[-1]) / 2
      return prev_sample(cur_sample, a_next, a_t, eps), buffers()

    def plms():
      e, n = push(ets)
      eps = jax.lax.switch(n - 1, [
          lambda: out,
          lambda: (3 * e[-1] - e[-2]) / 2,
          lambda: (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12,
          lambda: (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]),
      ])
      return prev_sample(x, a_t, a_prev, eps), buffers(e, n)

    def prk0():
      e, n = push(ets)
      return prev_sample(x, a_t, a_prev, out), buffers(e, n, cur_sample=x,
                                                       prk_sum=0 + 1 / 6 * out)

    def prk12():
      return prev_sample(cur_sample, a_t, a_prev, out), buffers(prk_sum=prk_sum + 1 / 3 * out)

    def prk3():
      eps = prk_sum + 1 / 6 * out
      return prev_sample(cur_sample, a_t, a_prev, eps), buffers(prk_sum=jnp.zeros_like(prk_sum))

    if self.config["skip_prk_steps"]:
      branch = jnp.where(c == 0, 0, jnp.where(c == 1, 1, 2))
      return jax.lax.switch(branch, [plms_first, plms_rerun, plms])
    branch = jnp.where(c < s["num_prk"], jnp.array([1, 2, 2, 3])[c % 4], 0)
    return jax.lax.switch(branch, [plms, prk0, prk12, prk3])

  def _euler_x0(self, x, out, sigma):
    pt = self.prediction_type
    if pt == "epsilon":
      return x - sigma * out
    if pt == "v_prediction":
      return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    return out  # sample / original_sample

  def _step_euler(self, state, out, i, x, noise):
    del noise
    sigmas = state.schedule["sigmas"]
    sigma = sigmas[i]
    x0 = self._euler_x0(x, out, sigma)
    derivative = (x - x0) / sigma
    return x + derivative * (sigmas[i + 1] - sigma), state.buffers

  def _step_euler_ancestral(self, state, out, i, x, noise):
    sigmas = state.schedule["sigmas"]
    sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
    x0 = self._euler_x0(x, out, sigma_from)
    sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    derivative = (x - x0) / sigma_from
    prev = x + derivative * (sigma_down - sigma_from)
    return prev + noise * sigma_up, state.buffers

  def _step_dpmsolverpp(self, state, out, i, x, noise):
    del noise
    c = self.config
    sigmas = state.schedule["sigmas"]
    order = c["solver_order"]

    def alpha_sigma(sigma):
      alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
      return alpha, sigma * alpha

    def lam(alpha, sigma):
      return jnp.log(alpha) - jnp.log(sigma)

    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    pt = self.prediction_type
    if pt == "epsilon":
      x0 = (x - sigma_s0 * out) / alpha_s0
    elif pt == "v_prediction":
      x0 = alpha_s0 * x - sigma_s0 * out
    else:
      x0 = out
    history = jnp.concatenate([state.buffers["model_outputs"][1:], x0[None]])
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    lambda_t, lambda_s0 = lam(alpha_t, sigma_t), lam(alpha_s0, sigma_s0)
    h = lambda_t - lambda_s0

    def first():
      return (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * x0

    def second():
      lambda_s1 = lam(*alpha_sigma(sigmas[i - 1]))
      m0, m1 = history[-1], history[-2]
      r0 = (lambda_s0 - lambda_s1) / h
      d0, d1 = m0, (1.0 / r0) * (m0 - m1)
      if c["solver_type"] == "midpoint":
        return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1)
      return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * d0
              + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1)

    def third():
      lambda_s1 = lam(*alpha_sigma(sigmas[i - 1]))
      lambda_s2 = lam(*alpha_sigma(sigmas[i - 2]))
      m0, m1, m2 = history[-1], history[-2], history[-3]
      h_0, h_1 = lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
      r0, r1 = h_0 / h, h_1 / h
      d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
      d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
      d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
      return ((sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * m0
              + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
              - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * d2)

    use = jnp.minimum(jnp.minimum(state.counter + 1, order), state.schedule["order_cap"][i])
    prev = jax.lax.switch(use - 1, [first, second, third][:order])
    return prev, {"model_outputs": history}

  # -- forward process ---------------------------------------------------------------------------

  def add_noise(self, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Training forward process q(x_t | x_0) at integer train timesteps (shape () or (B,)).

    The DDPM form sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for every scheduler (as diffusers'
    DDPM/DDIM/PNDM add_noise); for an img2img start latent in the scheduler's own sample space
    (sigma space for Euler types) use `add_noise_at`.
    """
    acp = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
    x = original.astype(jnp.float32)
    y = _expand(acp ** 0.5, x) * x + _expand((1 - acp) ** 0.5, x) * noise.astype(jnp.float32)
    return y.astype(original.dtype)

  def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (as diffusers' DDPM)."""
    acp = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
    x = sample.astype(jnp.float32)
    v = _expand(acp ** 0.5, x) * noise.astype(jnp.float32) - _expand((1 - acp) ** 0.5, x) * x
    return v.astype(sample.dtype)

  def add_noise_at(self, state: SchedulerState, original: jax.Array, noise: jax.Array,
                   step_index=0) -> jax.Array:
    """`original` noised to `state.timesteps[step_index]` in this scheduler's sample space.

    The img2img start latent (diffusers' `scheduler.add_noise(init, noise, timesteps[:1])`):
    x0 + sigma noise for Euler types, alpha x0 + sigma noise at the step's sigma for
    DPM-Solver, `add_noise` at the step's timestep otherwise.
    """
    if self.name in ("ddpm", "ddim", "pndm"):
      return self.add_noise(original, noise, state.timesteps[step_index])
    sigma = state.schedule["sigmas"][step_index]
    x, eps = original.astype(jnp.float32), noise.astype(jnp.float32)
    if self.name == "dpmsolver++":
      alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
      y = alpha * x + sigma * alpha * eps
    else:
      y = x + eps * sigma
    return y.astype(original.dtype)


def make_scheduler(name: str | None, config: Mapping[str, Any], *, eta: float = 0.0) -> Scheduler:
  """A scheduler from a pipeline's scheduler/scheduler_config.json dict.

  Args:
    name: one of NAMES, or None for the config's `_class_name`. Keys of the other supported
      classes are ignored (as diffusers' `from_config`), so any SD config builds any scheduler.
    config: the scheduler config dict.
    eta: DDIM's eta (DDIM only).

  Raises:
    MedjaxError for an unknown name or class, an unknown key or an unsupported value.
  """
  if name is None:
    cls = config.get("_class_name")
    if cls not in CLASS_NAMES:
      raise MedjaxError(f"scheduler config: '_class_name' = {cls!r} is not supported; expected "
                        f"one of {', '.join(CLASS_NAMES)} (or pass a scheduler name)")
    name = CLASS_NAMES[cls]
  if name not in NAMES:
    raise MedjaxError(f"scheduler name {name!r} is not supported; expected one of "
                      f"{', '.join(NAMES)}")
  if not _is_number(eta) or eta < 0 or (eta and name != "ddim"):
    raise MedjaxError(f"eta = {eta!r}; expected a number >= 0, and 0 for schedulers other "
                      "than 'ddim'")
  resolved = resolve_config(name, config)
  return Scheduler(name=name, options=tuple(sorted(resolved.items())), eta=float(eta))
