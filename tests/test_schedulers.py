"""medjax.schedulers vs diffusers 0.42 PyTorch schedulers (fp32).

Every case runs a whole sampling loop on random latents with the same random model outputs fed to
both sides (samples chained, so the multistep history is exercised), medjax's `step` inside
`jax.jit` + `lax.scan`. The noise of the stochastic schedulers is injected identically:
diffusers' `randn_tensor` is patched to return the noise medjax gets through `step(noise=)`.

Tolerances. Integer timesteps exactly equal. `scale_model_input` and every step output within
TOL = 1e-5 max abs error, scaled by max(1, |values|) of that step's input and output: random
model outputs drive some chained latents far from O(1) (to ~7e4 on the cosine schedule, whose
alpha-bar at t = 999 is ~4e-5), where one float32 ulp already exceeds 1e-5. Measured: <= 3e-5
abs where |latents| < 100, <= 6e-6 relative everywhere. Fractional (Karras / exponential Euler)
timesteps to rtol 1e-6, and zero-SNR alphas to 1e-5: torch's CPU sqrt (MKL) is not correctly
rounded, so sigmas derived through it can differ from NumPy's by 1 ulp.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import schedulers
from medjax.errors import MedjaxError

TOL = 1e-5
ACP_RTOL = 1e-5  # zero-terminal-SNR rescaling takes sqrt, where torch (MKL) differs by 1 ulp
SHAPE = (2, 4, 4, 3)  # the math is elementwise, so NHWC arrays go to torch unchanged

SD1 = {  # stable-diffusion-v1-5's scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}
SD2_V = {  # stable-diffusion-2(-1) 768: v-prediction
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
TRAILING_ZSNR = {**SD2_V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                 "steps_offset": 0}
LINSPACE_COS = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
                "timestep_spacing": "linspace", "prediction_type": "epsilon",
                "clip_sample": False}
CLIP_TRAINED = {"_class_name": "DDIMScheduler", "num_train_timesteps": 500,
                "trained_betas": np.linspace(1e-4, 0.03, 500).tolist(), "clip_sample": True,
                "clip_sample_range": 1.5, "set_alpha_to_one": True, "prediction_type": "sample",
                "timestep_spacing": "leading", "steps_offset": 0}
CONFIGS = {"sd1": SD1, "sd2_v": SD2_V, "trailing_zsnr": TRAILING_ZSNR,
           "linspace_cos": LINSPACE_COS, "clip_trained": CLIP_TRAINED}

SUPPORTS_SAMPLE = {"ddpm", "ddim", "euler", "dpmsolver++"}
# Per scheduler, options layered on the shared configs, so each compiled loop also covers a
# non-default option (one jit holds all loops; fewer loops keep the file fast). SD1 and SD2 stay
# as shipped, except DPM-Solver's SD2 run.
OPTIONS = {
    ("ddpm", "linspace_cos"): {"variance_type": "fixed_small_log"},
    ("ddpm", "trailing_zsnr"): {"variance_type": "fixed_large"},
    ("ddim", "linspace_cos"): {"eta": 0.7},
    ("pndm", "linspace_cos"): {"skip_prk_steps": False},
    ("euler", "linspace_cos"): {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    ("euler", "clip_trained"): {"use_exponential_sigmas": True, "sigma_max": 10.0},
    ("dpmsolver++", "sd2_v"): {"solver_type": "heun", "euler_at_final": True,
                               "use_karras_sigmas": True},
    ("dpmsolver++", "trailing_zsnr"): {"solver_order": 3, "lower_order_final": False,
                                       "final_sigmas_type": "sigma_min"},
    # (not Karras here: cosine Karras timesteps repeat 998 and diffusers' step index skips)
    ("dpmsolver++", "linspace_cos"): {"lambda_min_clipped": -5.1},
    ("dpmsolver++", "clip_trained"): {"solver_order": 1},
}


def _case(name, cfg, steps, start=0):
  options = dict(OPTIONS.get((name, cfg), {}))
  label = "-".join([name, cfg, *options] + (["img2img"] if start else []))
  eta = options.pop("eta", 0.0)
  return (label, name, {**CONFIGS[cfg], **options}, steps, start, eta)


# (id, scheduler, config, num_inference_steps, start_index, eta); odd step counts exercise
# uneven spacing, start_index > 0 is img2img (diffusers' set_begin_index + timesteps[k:]).
CASES = [_case(n, c, 13 if c in ("trailing_zsnr", "clip_trained") else 20)
         for n in schedulers.NAMES for c in CONFIGS
         if c != "clip_trained" or n in SUPPORTS_SAMPLE] + [
             _case(n, "sd2_v", 10, schedulers.start_index_for_strength(10, 0.6))
             for n in schedulers.NAMES]

_DIFFUSERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler",
              "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "dpmsolver++": "DPMSolverMultistepScheduler"}
_NOISE_MODULE = {"ddpm": "scheduling_ddpm",
                 "euler_ancestral": "scheduling_euler_ancestral_discrete"}


def diffusers_scheduler(name, config):
  import diffusers  # pylint: disable=g-import-not-at-top
  return getattr(diffusers, _DIFFUSERS[name]).from_config(config)


def err(got, want, inputs=0.0):
  """Max abs error, relative to the largest of 1, |want| and |inputs| (the step's sample)."""
  want = np.asarray(want, np.float64)
  scale = max(1.0, np.abs(want).max(), np.abs(np.asarray(inputs)).max())
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / scale)


def medjax_loop(sch, state, x, outs, noises):
  """The sampling loop as a lax.scan: (scaled model inputs, step outputs) per step."""
  def body(carry, inp):
    x, st = carry
    i, out, noise = inp
    scaled = sch.scale_model_input(st, x, i)
    x, st = sch.step(st, out, i, x, noise=noise)
    return (x, st), (scaled, x)
  (_, state), ys = jax.lax.scan(body, (x, state), (jnp.arange(state.num_steps), outs, noises))
  return ys, state.counter


def diffusers_loop(name, ref, x, timesteps, outs, noises, eta, mp):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import schedulers as dschedulers  # pylint: disable=g-import-not-at-top
  current = {}
  if name in _NOISE_MODULE:
    mp.setattr(getattr(dschedulers, _NOISE_MODULE[name]), "randn_tensor",
               lambda shape, **kw: current["noise"].clone())
  scaled, xs = [], []
  for i, t in enumerate(timesteps):
    current["noise"] = torch.from_numpy(noises[i])
    scaled.append(ref.scale_model_input(x, t).numpy())
    kw = {"eta": eta, "variance_noise": current["noise"]} if name == "ddim" else {}
    x = ref.step(torch.from_numpy(outs[i]), t, x, **kw).prev_sample
    xs.append(x.numpy())
  return np.stack(scaled), np.stack(xs)


@pytest.fixture(scope="module")
def runs():
  """Every case, medjax's loops all in one jit (one compile), and diffusers' loops."""
  import torch  # pylint: disable=g-import-not-at-top
  cases, args = {}, []
  for case_id, name, config, steps, start, eta in CASES:
    ref = diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    sch = schedulers.make_scheduler(name, config, eta=eta)
    state = sch.set_timesteps(steps, sample_shape=SHAPE, start_index=start)
    rng = np.random.default_rng(steps + start)
    n = state.num_steps
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    outs = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    noises = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    timesteps = ref.timesteps[start:]
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    if start:  # img2img: x0 is the image, noised to the first kept step
      if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
      x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    else:
      x_ref = torch.from_numpy(x0) * ref.init_noise_sigma
    cases[case_id] = {"name": name, "sch": sch, "state": state, "ref": ref,
                      "x_ref": x_ref.numpy(), "timesteps": timesteps.numpy(), "outs": outs,
                      "noises": noises, "eta": eta}
    args.append((state, x0, noise, outs, noises))

  def run(sch, state, x0, noise, outs, noises, img2img):
    x = sch.add_noise_at(state, x0, noise) if img2img else x0 * sch.init_noise_sigma(state)
    return (x,) + medjax_loop(sch, state, x, outs, noises)

  flags = [c[4] > 0 for c in CASES]
  schs = [c["sch"] for c in cases.values()]
  got = jax.jit(lambda args: [run(s, *a, f)
                              for s, a, f in zip(schs, args, flags, strict=True)])(args)
  with pytest.MonkeyPatch.context() as mp:
    for c, (x, (scaled, xs), counter) in zip(cases.values(), got, strict=True):
      c["x"], c["scaled"], c["xs"] = np.asarray(x), np.asarray(scaled), np.asarray(xs)
      c["counter"] = int(counter)
      c["want_scaled"], c["want_xs"] = diffusers_loop(
          c["name"], c["ref"], torch.from_numpy(c["x_ref"]), torch.from_numpy(c["timesteps"]),
          c["outs"], c["noises"], c["eta"], mp)
  return cases


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_run_matches_diffusers(runs, case_id):
  c = runs[case_id]
  state, ref = c["state"], c["ref"]
  if np.issubdtype(c["timesteps"].dtype, np.integer) or not (
      c["sch"].config.get("use_karras_sigmas") or c["sch"].config.get("use_exponential_sigmas")):
    np.testing.assert_array_equal(np.asarray(state.timesteps), c["timesteps"])
  else:  # fractional timesteps from sigmas; torch's MKL sqrt differs from IEEE's by 1 ulp
    np.testing.assert_allclose(np.asarray(state.timesteps), c["timesteps"], rtol=1e-6)
  assert float(c["sch"].init_noise_sigma(state)) == pytest.approx(float(ref.init_noise_sigma),
                                                                  rel=1e-6)
  assert err(c["x"], c["x_ref"]) <= TOL  # initial latents (add_noise_at for img2img)
  assert np.isfinite(c["want_xs"]).all()
  assert err(c["scaled"], c["want_scaled"]) <= TOL
  inputs = [c["x_ref"]] + list(c["want_xs"][:-1])
  errors = [err(c["xs"][i], c["want_xs"][i], inputs[i]) for i in range(state.num_steps)]
  assert max(errors) <= TOL, errors
  assert c["counter"] == state.num_steps


def test_step_with_key_draws_standard_normal_noise():
  """key= draws jax.random.normal(key, sample.shape), so noise= tests cover the key path."""
  sch = schedulers.make_scheduler("euler_ancestral", SD1)
  state = sch.set_timesteps(3)
  rng = np.random.default_rng(1)
  x, out = rng.standard_normal((2,) + SHAPE).astype(np.float32)

  @jax.jit
  def both(state, x, out, key):
    with_key, new_state = sch.step(state, out, 1, x, key=key)
    with_noise, _ = sch.step(state, out, 1, x, noise=jax.random.normal(key, SHAPE))
    return with_key, with_noise, new_state.counter

  # Any key type works; rbg compiles faster than the default threefry on CPU.
  with_key, with_noise, counter = both(state, x, out, jax.random.key(0, impl="rbg"))
  np.testing.assert_array_equal(with_key, with_noise)
  assert int(counter) == 1


@pytest.mark.parametrize("config", [SD1, SD2_V, TRAILING_ZSNR, LINSPACE_COS, CLIP_TRAINED],
                         ids=list(CONFIGS))
def test_add_noise_and_velocity_match_ddpm(config):
  import torch  # pylint: disable=g-import-not-at-top
  ref = diffusers_scheduler("ddpm", config)
  rng = np.random.default_rng(3)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  t = np.array([0, config.get("num_train_timesteps", 1000) - 1])
  want_noisy = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
  want_v = ref.get_velocity(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
  for name in ("ddpm", "ddim", "pndm"):
    if name == "pndm" and (config.get("rescale_betas_zero_snr")  # not PNDM options
                           or config.get("prediction_type") == "sample"):
      continue
    sch = schedulers.make_scheduler(name, config)
    np.testing.assert_allclose(sch.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=ACP_RTOL)
    assert err(sch.add_noise(x, noise, t), want_noisy.numpy()) <= TOL
    assert err(sch.get_velocity(x, noise, t), want_v.numpy()) <= TOL
  sch = schedulers.make_scheduler("ddpm", config)
  scalar = sch.add_noise(x, noise, 7)  # one timestep for the whole batch
  assert err(scalar, ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise),
                                   torch.tensor([7])).numpy()) <= TOL


def test_alphas_cumprod_match_every_class():
  for name in schedulers.NAMES:
    for config in CONFIGS.values():
      ref = diffusers_scheduler(name, config)
      if name in ("pndm", "euler_ancestral") and config.get("prediction_type") == "sample":
        continue
      got = schedulers.make_scheduler(name, config).alphas_cumprod
      if config.get("rescale_betas_zero_snr") and name != "pndm":
        np.testing.assert_allclose(got, ref.alphas_cumprod.numpy(), rtol=ACP_RTOL)
      else:  # bit for bit: torch.linspace and torch.cumprod are mirrored exactly
        np.testing.assert_array_equal(got, ref.alphas_cumprod.numpy())


def test_defaults_table_matches_diffusers_signatures():
  for name, cls_name in _DIFFUSERS.items():
    import diffusers  # pylint: disable=g-import-not-at-top
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    want = {k: p.default for k, p in params.items() if k != "self"}
    assert schedulers.DEFAULTS[name] == want, name


def test_registry_lists_each_family():
  assert schedulers.NAMES == ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++")
  assert set(schedulers.REGISTRY) == set(schedulers.NAMES)
  for name, cls in schedulers.REGISTRY.items():
    assert cls.name == name and schedulers.CLASS_NAMES[cls.class_name] == name
    assert cls.class_name == _DIFFUSERS[name]
    assert type(schedulers.make_scheduler(name, SD1)) is cls


def test_unknown_scheduler_name_is_one_line_naming_the_known_ones():
  with pytest.raises(MedjaxError, match="scheduler name 'heun'") as e:
    schedulers.make_scheduler("heun", SD1)
  message = str(e.value)
  assert "\n" not in message
  assert all(name in message for name in schedulers.NAMES), message


def test_class_name_and_hashable():
  sch = schedulers.make_scheduler(None, SD1)
  assert sch.name == "pndm" and sch.config["skip_prk_steps"] is True
  assert hash(sch) == hash(schedulers.make_scheduler("pndm", dict(SD1)))
  assert schedulers.make_scheduler(None, SD2_V).prediction_type == "v_prediction"
  euler = schedulers.make_scheduler("euler", SD1)  # PNDM-only keys are dropped, like diffusers
  assert "skip_prk_steps" not in euler.config and euler.config["timestep_spacing"] == "linspace"


@pytest.mark.parametrize("name,config,match", [
    ("heun", SD1, "scheduler name 'heun'"),
    (None, {**SD1, "_class_name": "LMSDiscreteScheduler"}, "_class_name"),
    (None, {"beta_schedule": "linear"}, "_class_name"),
    ("ddim", {**SD1, "beta_schedule": "sigmoid"}, "'beta_schedule' = 'sigmoid'"),
    ("ddim", {**SD1, "prediction_type": "flow"}, "'prediction_type'"),
    ("pndm", {**SD1, "prediction_type": "sample"}, "'prediction_type'"),
    ("euler_ancestral", {**SD1, "prediction_type": "sample"}, "'prediction_type'"),
    ("ddim", {**SD1, "thresholding": True}, "'thresholding'"),
    ("ddim", {**SD1, "timestep_spacing": "karras"}, "'timestep_spacing'"),
    ("ddpm", {**SD1, "variance_type": "learned_range"}, "'variance_type'"),
    ("dpmsolver++", {**SD1, "algorithm_type": "sde-dpmsolver++"}, "'algorithm_type'"),
    ("dpmsolver++", {**SD1, "solver_order": 4}, "'solver_order'"),
    ("dpmsolver++", {**SD1, "use_lu_lambdas": True}, "'use_lu_lambdas'"),
    ("euler", {**SD1, "interpolation_type": "log_linear"}, "'interpolation_type'"),
    ("euler", {**SD1, "use_beta_sigmas": True}, "'use_beta_sigmas'"),
    ("euler", {**SD1, "use_karras_sigmas": True, "use_exponential_sigmas": True},
     "'use_karras_sigmas'"),
    ("ddim", {**SD1, "steps_offset": -1}, "'steps_offset'"),
    ("ddim", {**SD1, "set_alpha_to_one": "no"}, "'set_alpha_to_one'"),
    ("ddim", {**SD1, "my_option": 1}, "unknown key 'my_option'"),
    ("ddim", {**SD1, "trained_betas": [0.1, 0.2]}, "'trained_betas'"),
    ("euler", SD1, "eta"),
])
def test_bad_config_raises(name, config, match):
  with pytest.raises(MedjaxError, match=match):
    schedulers.make_scheduler(name, config, eta=0.5 if match == "eta" else 0.0)


def test_bad_steps_raise():
  sch = schedulers.make_scheduler("ddim", SD1)
  for steps in (0, -3, 1001, 2.5, True):
    with pytest.raises(MedjaxError, match="num_inference_steps"):
      sch.set_timesteps(steps)
  with pytest.raises(MedjaxError, match="start_index"):
    sch.set_timesteps(10, start_index=10)
  with pytest.raises(MedjaxError, match="sample_shape"):
    schedulers.make_scheduler("dpmsolver++", SD1).set_timesteps(10)
  with pytest.raises(MedjaxError, match="skip_prk_steps"):
    schedulers.make_scheduler("pndm", {**SD1, "skip_prk_steps": False}).set_timesteps(
        10, sample_shape=SHAPE, start_index=2)
  with pytest.raises(MedjaxError, match="key"):
    anc = schedulers.make_scheduler("euler_ancestral", SD1)
    state = anc.set_timesteps(3)
    anc.step(state, jnp.zeros(SHAPE), 0, jnp.zeros(SHAPE))
  with pytest.raises(MedjaxError, match="strength"):
    schedulers.start_index_for_strength(10, 1.5)
