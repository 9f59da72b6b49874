"""DPM-Solver++ multistep, orders 1-3 (diffusers' DPMSolverMultistepScheduler).

Only algorithm_type 'dpmsolver++' (no SDE variants, no 'dpmsolver'); no Lu-lambda, beta or flow
sigmas; no dynamic thresholding.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from medjax import validation
from medjax.schedulers import schedule
from medjax.schedulers.base import Scheduler
from medjax.schedulers.base import SchedulerState
from medjax.schedulers.registry import register


@register
class DPMSolverPP(Scheduler):
  name = "dpmsolver++"
  class_name = "DPMSolverMultistepScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "solver_order": 2, "prediction_type": "epsilon",
              "thresholding": False, "dynamic_thresholding_ratio": 0.995,
              "sample_max_value": 1.0, "algorithm_type": "dpmsolver++",
              "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
              "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
              "flow_shift": 1.0, "final_sigmas_type": "zero",
              "lambda_min_clipped": -math.inf, "variance_type": None,
              "timestep_spacing": "linspace", "steps_offset": 0,
              "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
              "time_shift_type": "exponential"}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction", "sample"),
           "variance_type": validation.one_of(None)}
  sigma_space = True

  def _schedule(self, n):
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
    train = schedule.train_sigmas(acp)
    if c["use_karras_sigmas"] or c["use_exponential_sigmas"]:
      sigmas = schedule.convert_sigmas(c, train[::-1].copy(), n)
      ts = schedule.sigma_to_t(sigmas, np.log(train))
      if c["use_karras_sigmas"] and c["beta_schedule"] != "squaredcos_cap_v2":
        ts = ts.round()
      ts = ts.astype(np.int64)
    else:
      sigmas = np.interp(ts, np.arange(0, len(train)), train)
    sigmas = np.concatenate([sigmas, [schedule.final_sigma(c, acp)]]).astype(np.float32)
    # Highest solver order each step may use (diffusers' lower_order_final / _second).
    num = len(ts)
    cap = np.full(num, c["solver_order"], np.int32)
    short = c["lower_order_final"] and num < 15
    if num >= 2 and short:
      cap[-2] = min(cap[-2], 2)
    if c["euler_at_final"] or short or c["final_sigmas_type"] == "zero":
      cap[-1] = 1
    return ts, {"sigmas": sigmas, "order_cap": cap}, {"sigmas", "order_cap"}

  def _buffers(self, sample_shape):
    shape = self._history_shape(sample_shape)
    return {"model_outputs": np.zeros((self.config["solver_order"],) + shape, np.float32)}

  def add_noise_at(self, state: SchedulerState, original: jax.Array, noise: jax.Array,
                   step_index=0) -> jax.Array:
    """alpha x0 + sigma alpha noise at the step's sigma (alpha = 1 / sqrt(sigma^2 + 1))."""
    sigma = state.schedule["sigmas"][step_index]
    x, eps = original.astype(jnp.float32), noise.astype(jnp.float32)
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return (alpha * x + sigma * alpha * eps).astype(original.dtype)

  def _step(self, state, out, i, x, noise):
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
