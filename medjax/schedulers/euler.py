"""Euler and Euler ancestral (diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler).

Both step in sigma space: the sample is x0 + sigma noise, the model sees it scaled by
1 / sqrt(sigma^2 + 1), and timesteps are float32 (fractional with Karras / exponential sigmas).
Not implemented: 'log_linear' interpolation, 'continuous' timesteps, beta sigmas, s_churn.
"""
import jax
import jax.numpy as jnp
import numpy as np

from medjax import validation
from medjax.schedulers import schedule
from medjax.schedulers.base import Scheduler
from medjax.schedulers.base import SchedulerState
from medjax.schedulers.registry import register


class EulerBase(Scheduler):
  """The schedule, input scaling and x0 prediction both Euler types share."""
  sigma_space = True
  timestep_dtype = np.float32

  def _schedule(self, n):
    c = self.config
    ts = schedule.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                                   c["steps_offset"]).astype(np.float32)
    train = schedule.train_sigmas(self.alphas_cumprod)
    sigmas = np.interp(ts, np.arange(0, len(train)), train)
    if c.get("use_karras_sigmas") or c.get("use_exponential_sigmas"):
      sigmas = schedule.convert_sigmas(c, sigmas, n)
      ts = schedule.sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    sigmas = np.concatenate([sigmas, [schedule.final_sigma(c, self.alphas_cumprod)]]).astype(
        np.float32)
    sched = {"sigmas": sigmas, "init_noise_sigma": self._init_noise_sigma(sigmas)}
    return ts, sched, {"sigmas"}

  def _init_noise_sigma(self, sigmas):
    max_sigma = sigmas.max()
    if self.config["timestep_spacing"] in ("linspace", "trailing"):
      return np.float32(max_sigma)
    return np.float32((max_sigma ** 2 + np.float32(1)) ** np.float32(0.5))

  def scale_model_input(self, state: SchedulerState, sample: jax.Array,
                        step_index) -> jax.Array:
    sigma = state.schedule["sigmas"][step_index]
    return (sample.astype(jnp.float32) / (sigma ** 2 + 1) ** 0.5).astype(sample.dtype)

  def add_noise_at(self, state: SchedulerState, original: jax.Array, noise: jax.Array,
                   step_index=0) -> jax.Array:
    """x0 + sigma noise at the step's sigma."""
    sigma = state.schedule["sigmas"][step_index]
    x, eps = original.astype(jnp.float32), noise.astype(jnp.float32)
    return (x + eps * sigma).astype(original.dtype)

  def _x0(self, x, out, sigma):
    pt = self.prediction_type
    if pt == "epsilon":
      return x - sigma * out
    if pt == "v_prediction":
      return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    return out  # sample / original_sample


@register
class Euler(EulerBase):
  name = "euler"
  class_name = "EulerDiscreteScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "prediction_type": "epsilon",
              "interpolation_type": "linear", "use_karras_sigmas": False,
              "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None,
              "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
              "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction", "sample",
                                                "original_sample")}

  def _step(self, state, out, i, x, noise):
    del noise
    sigmas = state.schedule["sigmas"]
    sigma = sigmas[i]
    x0 = self._x0(x, out, sigma)
    derivative = (x - x0) / sigma
    return x + derivative * (sigmas[i + 1] - sigma), state.buffers


@register
class EulerAncestral(EulerBase):
  name = "euler_ancestral"
  class_name = "EulerAncestralDiscreteScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "prediction_type": "epsilon",
              "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction")}

  @property
  def is_stochastic(self) -> bool:
    return True

  def _step(self, state, out, i, x, noise):
    sigmas = state.schedule["sigmas"]
    sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
    x0 = self._x0(x, out, sigma_from)
    sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    derivative = (x - x0) / sigma_from
    prev = x + derivative * (sigma_down - sigma_from)
    return prev + noise * sigma_up, state.buffers
