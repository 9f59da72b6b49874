"""DDIM (diffusers' DDIMScheduler): deterministic for eta = 0, eta > 0 adds noise."""
from medjax import validation
from medjax.schedulers import schedule
from medjax.schedulers.base import AlphaScheduler
from medjax.schedulers.registry import register


@register
class DDIM(AlphaScheduler):
  """Thresholding is not implemented."""
  name = "ddim"
  class_name = "DDIMScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "clip_sample": True, "set_alpha_to_one": True,
              "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
              "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
              "sample_max_value": 1.0, "timestep_spacing": "leading",
              "rescale_betas_zero_snr": False}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction", "sample")}
  takes_eta = True

  @property
  def is_stochastic(self) -> bool:
    return self.eta > 0

  def _schedule(self, n):
    ts = self._int_timesteps(n)
    prev = ts - self.num_train_timesteps // n
    sched = {"alpha_t": self._alpha_at(ts, 1.0),
             "alpha_prev": self._alpha_at(prev, self._final_alpha())}
    return ts, sched, set(sched)

  def _step(self, state, out, i, x, noise):
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
