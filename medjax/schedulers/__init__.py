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

Layout: `schedule` (NumPy schedule math shared by all families, config checking), `base` (the
`Scheduler` interface and `SchedulerState`), `registry` (families by name, `make_scheduler`),
one module per family: `ddpm`, `ddim`, `pndm`, `euler` (Euler and Euler ancestral),
`dpmsolver` (DPM-Solver++). `step` computes in float32 and returns `sample.dtype`.

Not implemented (a MedjaxError names the key): dynamic thresholding, learned DDPM variances,
DPM-Solver algorithms other than 'dpmsolver++' (SDE, 'dpmsolver'), beta / Lu-lambda / flow
sigmas, Euler's 'log_linear' interpolation and 'continuous' timesteps. Also absent: Euler's
s_churn step arguments and custom timestep / sigma lists in `set_timesteps`.
"""
# The family modules register themselves on import (NAMES' order is registry.LISTING_ORDER).
# pylint: disable=unused-import
from medjax.schedulers import ddim  # noqa: F401
from medjax.schedulers import ddpm  # noqa: F401
from medjax.schedulers import dpmsolver  # noqa: F401
from medjax.schedulers import euler  # noqa: F401
from medjax.schedulers import pndm  # noqa: F401
from medjax.schedulers import registry as _registry

# pylint: enable=unused-import
from medjax.schedulers.base import Scheduler
from medjax.schedulers.base import SchedulerState
from medjax.schedulers.registry import REGISTRY
from medjax.schedulers.registry import make_scheduler
from medjax.schedulers.registry import register
from medjax.schedulers.registry import resolve_config
from medjax.schedulers.schedule import INERT_KEYS
from medjax.schedulers.schedule import start_index_for_strength

# medjax scheduler names, e.g. for command-line choices.
NAMES = _registry.names()
# diffusers class name -> medjax scheduler name.
CLASS_NAMES = _registry.class_names()
# Every constructor argument of each diffusers class with its default (the config keys it reads).
DEFAULTS = {name: cls.defaults for name, cls in REGISTRY.items()}
# Keys any of the classes reads; a key of another class is dropped, as diffusers' from_config.
KNOWN_KEYS = _registry.known_keys()

__all__ = ["CLASS_NAMES", "DEFAULTS", "INERT_KEYS", "KNOWN_KEYS", "NAMES", "REGISTRY",
           "Scheduler", "SchedulerState", "make_scheduler", "register", "resolve_config",
           "start_index_for_strength"]
