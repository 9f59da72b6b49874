"""PNDM (diffusers' PNDMScheduler): Runge-Kutta warm-up (PRK) then linear multistep (PLMS)."""
import jax
import jax.numpy as jnp
import numpy as np

from medjax import validation
from medjax.errors import MedjaxError
from medjax.schedulers import schedule
from medjax.schedulers.base import AlphaScheduler
from medjax.schedulers.registry import register


@register
class PNDM(AlphaScheduler):
  """With `skip_prk_steps` (Stable Diffusion's configs) the second step re-runs the first one,
  so a run takes one step more than asked; PRK mode takes 8 more."""
  name = "pndm"
  class_name = "PNDMScheduler"
  defaults = {**schedule.BETA_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False,
              "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0}
  rules = {"prediction_type": validation.one_of("epsilon", "v_prediction")}

  def _schedule(self, n):
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

  def _check_start(self, start_index):
    if start_index and not self.config["skip_prk_steps"]:
      raise MedjaxError("start_index > 0 needs 'skip_prk_steps': true for the 'pndm' scheduler "
                        "(its Runge-Kutta warm-up must start at step 0)")

  def _buffers(self, sample_shape):
    shape = self._history_shape(sample_shape)
    return {"ets": np.zeros((4,) + shape, np.float32), "num_ets": np.int32(0),
            "cur_sample": np.zeros(shape, np.float32), "prk_sum": np.zeros(shape, np.float32)}

  def _step(self, state, out, i, x, noise):
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
