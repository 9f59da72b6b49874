"""The scheduler interface every family implements, and its state.

A `Scheduler` is a frozen, hashable description of one diffusers scheduler config, so jitted
code can close over it or take it as a static argument. `set_timesteps` computes in NumPy what
depends only on the number of steps (a family's `_schedule`), `step` is pure jnp on the gathered
per-step values (a family's `_step`). The family classes live in their own modules and are
found by name through `registry`.
"""
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medjax import validation
from medjax.errors import MedjaxError
from medjax.schedulers import schedule


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


def expand(c: jax.Array, x: jax.Array) -> jax.Array:
  """Per-sample coefficients (B,) or () -> broadcastable over x's trailing axes, as diffusers."""
  c = jnp.reshape(c, (-1,))
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class Scheduler:
  """One diffusers scheduler config, hashable (static under jit); methods are pure functions.

  A family subclass sets the class attributes below and implements `_schedule` and `_step`.

  Attributes:
    options: the resolved config (class defaults + given keys) as sorted (key, value) pairs.
    eta: DDIM's eta (0 = deterministic DDIM; > 0 adds noise and needs a key); DDIM only.
  """
  options: tuple[tuple[str, Any], ...]
  eta: float = 0.0

  name: ClassVar[str]  # the medjax name, a `registry.REGISTRY` key
  class_name: ClassVar[str]  # the diffusers class (a config's '_class_name')
  # Every constructor argument of the diffusers class with its default (the config keys it
  # reads); a test checks these against the diffusers signatures.
  defaults: ClassVar[dict[str, Any]]
  rules: ClassVar[dict[str, validation.Rule]] = {}  # value rules beyond schedule.SHARED_RULES
  sigma_space: ClassVar[bool] = False  # samples live in sigma space (Euler types, DPM-Solver)
  timestep_dtype: ClassVar[type] = np.int32
  takes_eta: ClassVar[bool] = False  # only DDIM has an eta

  @classmethod
  def resolve(cls, config: Mapping[str, Any], known_keys) -> dict[str, Any]:
    """This class's defaults updated with `config`, every key and value checked."""
    return schedule.resolve(cls.name, cls.defaults, cls.rules, config, known_keys)

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
    return False

  @functools.cached_property
  def _alphas_cumprod(self) -> np.ndarray:
    return schedule.alphas_cumprod(self.config, self.sigma_space)

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
    if not validation.is_int(n) or not 0 < n <= t_train:
      raise MedjaxError(f"num_inference_steps = {n!r}; expected an integer in "
                        f"[1, num_train_timesteps = {t_train}]")
    n = int(n)
    timesteps, sched, per_step = self._schedule(n)
    if not 0 <= start_index < len(timesteps) or isinstance(start_index, bool):
      raise MedjaxError(f"start_index = {start_index!r}; expected an integer in "
                        f"[0, {len(timesteps)})")
    self._check_start(start_index)
    sched = {k: jnp.asarray(v[start_index:] if k in per_step else v) for k, v in sched.items()}
    buffers = self._buffers(sample_shape)
    # NumPy -> device transfers only: no op is compiled before the sampling loop.
    return SchedulerState(
        timesteps=jnp.asarray(timesteps[start_index:].astype(self.timestep_dtype)),
        schedule=sched, buffers=jax.tree.map(jnp.asarray, buffers),
        counter=jnp.asarray(np.int32(0)))

  def _schedule(self, n: int) -> tuple[np.ndarray, dict[str, np.ndarray], set[str]]:
    """(timesteps, schedule arrays, names of the per-step ones) for `n` inference steps."""
    raise NotImplementedError

  def _check_start(self, start_index: int) -> None:
    """Raises if this config cannot start at `start_index` > 0."""

  def _buffers(self, sample_shape: Sequence[int] | None) -> dict[str, np.ndarray]:
    """The initial multistep history (none for single-step schedulers)."""
    del sample_shape
    return {}

  def _history_shape(self, sample_shape: Sequence[int] | None) -> tuple[int, ...]:
    if sample_shape is None:
      raise MedjaxError(f"set_timesteps: the {self.name!r} scheduler needs sample_shape "
                        "(the latent shape) for its history buffers")
    return tuple(int(d) for d in sample_shape)

  # -- per-step functions (jnp; step_index may be traced) -----------------------------------------

  def init_noise_sigma(self, state: SchedulerState) -> jax.Array:
    """Scale of the initial noise (1 except for Euler types), as diffusers' init_noise_sigma."""
    return state.schedule.get("init_noise_sigma", jnp.ones((), jnp.float32))

  def scale_model_input(self, state: SchedulerState, sample: jax.Array,
                        step_index) -> jax.Array:
    """The model's input at `step_index`: sample / sqrt(sigma^2 + 1) for Euler types."""
    del state, step_index
    return sample

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
    prev, buffers = self._step(state, out, i, x, noise)
    new_state = state.replace(buffers=buffers, counter=state.counter + 1)
    return prev.astype(sample.dtype), new_state

  def _step(self, state: SchedulerState, out: jax.Array, i: jax.Array, x: jax.Array,
            noise: jax.Array | None) -> tuple[jax.Array, dict]:
    """(previous sample in float32, new history buffers) from float32 inputs."""
    raise NotImplementedError

  # -- forward process ---------------------------------------------------------------------------

  def add_noise(self, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Training forward process q(x_t | x_0) at integer train timesteps (shape () or (B,)).

    The DDPM form sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for every scheduler (as diffusers'
    DDPM/DDIM/PNDM add_noise); for an img2img start latent in the scheduler's own sample space
    (sigma space for Euler types) use `add_noise_at`.
    """
    acp = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
    x = original.astype(jnp.float32)
    y = expand(acp ** 0.5, x) * x + expand((1 - acp) ** 0.5, x) * noise.astype(jnp.float32)
    return y.astype(original.dtype)

  def get_velocity(self, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (as diffusers' DDPM)."""
    acp = jnp.asarray(self.alphas_cumprod)[jnp.asarray(timesteps, jnp.int32)]
    x = sample.astype(jnp.float32)
    v = expand(acp ** 0.5, x) * noise.astype(jnp.float32) - expand((1 - acp) ** 0.5, x) * x
    return v.astype(sample.dtype)

  def add_noise_at(self, state: SchedulerState, original: jax.Array, noise: jax.Array,
                   step_index=0) -> jax.Array:
    """`original` noised to `state.timesteps[step_index]` in this scheduler's sample space.

    The img2img start latent (diffusers' `scheduler.add_noise(init, noise, timesteps[:1])`):
    `add_noise` at the step's timestep for the alpha-space schedulers; sigma-space families
    override it.
    """
    return self.add_noise(original, noise, state.timesteps[step_index])


class AlphaScheduler(Scheduler):
  """DDPM, DDIM and PNDM: integer timesteps and per-step alpha-bar tables."""

  def _alpha_at(self, t: np.ndarray, final: float) -> np.ndarray:
    """alpha-bar at timesteps `t`; `final` where t < 0 (the step after the last)."""
    acp = self.alphas_cumprod
    return np.where(t >= 0, acp[np.clip(t, 0, len(acp) - 1)], np.float32(final)).astype(
        np.float32)

  def _final_alpha(self) -> float:
    return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

  def _int_timesteps(self, n: int) -> np.ndarray:
    c = self.config
    return schedule.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                                     c["steps_offset"]).round().astype(np.int64)

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

