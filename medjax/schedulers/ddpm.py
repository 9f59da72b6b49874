"""DDPM (diffusers' DDPMScheduler): ancestral sampling with fixed variances."""
import jax.numpy as jnp
import numpy as np

from medjax import validation
from medjax.schedulers import schedule
from medjax.schedulers.base import AlphaScheduler
from medjax.schedulers.registry import register


@register
class DDPM(AlphaScheduler):
  """Learned variances ('learned', 'learned_range') and thresholding are not implemented."""
  name = "ddpm"
  class_name = "DDPMScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "variance_type": "fixed_small", "clip_sample": True,
              "prediction_type": "epsilon", "thresholding": False,
              "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
              "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0,
              "rescale_betas_zero_snr": False}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction", "sample"),
           "variance_type": validation.one_of("fixed_small", "fixed_small_log", "fixed_large")}

  @property
  def is_stochastic(self) -> bool:
    return True

  def _schedule(self, n):
    ts = self._int_timesteps(n)
    first = np.array([np.nonzero(ts == t)[0][0] for t in ts])  # diffusers' previous_timestep
    prev = np.where(first == len(ts) - 1, -1, ts[np.minimum(first + 1, len(ts) - 1)])
    sched = {"alpha_t": self._alpha_at(ts, 1.0), "alpha_prev": self._alpha_at(prev, 1.0),
             "has_noise": ts > 0}
    return ts, sched, set(sched)

  def _step(self, state, out, i, x, noise):
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
