"""Text-to-image, img2img and inpainting as one compiled graph per shape.

The whole denoising loop is a `lax.scan` inside one jitted function (initial noise, U-Net with
classifier-free guidance, scheduler step, inpainting blend, VAE decode). Prompts arrive as text
embeddings (the text and VAE encoders are their own cached jitted calls), seeds as integers and
the guidance scale as a traced scalar, so a new prompt, seed or scale reuses the compiled
program; it is built again only for a new batch shape, number of steps, scheduler or guidance
on/off. txt2img, img2img and 4-channel inpainting share the same program: txt2img is img2img
from no image with an all-"generate" mask, which changes no bit of the result.

Guidance follows diffusers (unconditional = the negative prompt, "" when none) and extends to
AUTOMATIC1111's composable prompts, "healthy:0.3 AND diseased:0.7":
eps = uncond + scale * sum_k w_k (cond_k - uncond).
"""
import collections
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import schedulers
from medjax.errors import MedjaxError

# Traces of the generation graph per scheduler name (tests check that nothing recompiles).
TRACES = collections.Counter()

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def parse_prompt(prompt: str) -> list[tuple[str, float]]:
  """AUTOMATIC1111's composable prompt: "a:0.3 AND b" -> [("a", 0.3), ("b", 1.0)].

  Parts are split on the word AND (upper case, as the web UI); a trailing ":number" is the
  part's weight (default 1).
  """
  if not isinstance(prompt, str):
    raise MedjaxError(f"prompt {prompt!r}: expected a string")
  pieces = _AND.split(prompt)
  parts = []
  for piece in pieces:
    text, weight = _WEIGHT.match(piece).groups()
    text = text.strip()
    if not text and len(pieces) > 1:
      raise MedjaxError(f"prompt {prompt!r}: empty part around AND; expected "
                        "'text[:weight] AND text[:weight]'")
    parts.append((text, 1.0 if weight is None else float(weight)))
  return parts


def interpolate_embeddings(e0, e1, weights: Sequence[float]) -> jax.Array:
  """Text embeddings (1 - w) e0 + w e1 for each w: a row from one prompt to another.

  Args:
    e0, e1: embeddings [77, D] or [1, 77, D] (e.g. of "healthy ..." and "diseased ...").
    weights: interpolation weights (0 = e0, 1 = e1).
  Returns:
    [len(weights), 77, D], to pass as `generate(prompt_embeds=...)`.
  """
  e0, e1 = jnp.asarray(e0, jnp.float32), jnp.asarray(e1, jnp.float32)
  if e0.shape != e1.shape or e0.ndim not in (2, 3) or (e0.ndim == 3 and e0.shape[0] != 1):
    raise MedjaxError(f"interpolate_embeddings: e0 {tuple(e0.shape)} and e1 {tuple(e1.shape)} "
                      "must have one shape, [77, D] or [1, 77, D]")
  w = jnp.asarray(weights, jnp.float32).reshape(-1, 1, 1)
  return (1 - w) * e0.reshape(e0.shape[-2:]) + w * e1.reshape(e1.shape[-2:])


# -- input checking ---------------------------------------------------------------------------


def _as_list(value, name) -> list[str]:
  values = [value] if isinstance(value, str) else list(value)
  if not values or not all(isinstance(v, str) for v in values):
    raise MedjaxError(f"{name} = {value!r}: expected a string or a non-empty list of strings")
  return values


def _seeds(seed, batch: int) -> np.ndarray:
  """Per-image seeds: an int s gives s, s+1, ... (image i's noise never depends on batching)."""
  seeds = [seed + i for i in range(batch)] if isinstance(seed, (int, np.integer)) else list(seed)
  if len(seeds) != batch or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                    and 0 <= s < 2 ** 32 for s in seeds):
    raise MedjaxError(f"seed = {seed!r}: expected an integer in [0, 2^32) or {batch} of them")
  return np.asarray(seeds, np.uint32)


def _image_batch(x, name, batch, channels, size=None) -> np.ndarray:
  """[H, W, C] or [B, H, W, C] (C may be absent for masks) -> float32 [batch, H, W, C]."""
  x = np.asarray(x, np.float32)
  if channels == 1 and x.ndim in (2, 3) and (x.ndim == 2 or x.shape[-1] != 1):
    x = x[..., None]
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[-1] != channels or x.shape[0] not in (1, batch):
    raise MedjaxError(f"{name}: shape {x.shape}; expected [H, W, {channels}] or "
                      f"[{batch}, H, W, {channels}] with values in [0, 1]")
  if not np.all((x >= 0) & (x <= 1)):
    raise MedjaxError(f"{name}: values in [{x.min():g}, {x.max():g}]; expected [0, 1]")
  if size is not None and x.shape[1:3] != size:
    raise MedjaxError(f"{name}: size {x.shape[1]}x{x.shape[2]} does not match the image's "
                      f"{size[0]}x{size[1]}")
  return np.broadcast_to(x, (batch,) + x.shape[1:])


# -- the compiled graph -----------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _graph(unet, vae, scaling_factor: float, sch, guided: bool, mesh, data_axis: str):
  """The jitted generation function (cached by architecture; jax retraces for new shapes).

  Keyed on the (hashable, stateless) modules rather than the model object, so the cache holds
  no params and models of one architecture share compiled programs.
  """
  return jax.jit(functools.partial(_generate_graph, unet, vae, scaling_factor, sch, guided, mesh,
                                   data_axis))


def _generate_graph(unet, vae, scaling_factor, sch, guided, mesh, data_axis, params, state, cond,
                    uncond, weights, guidance, seeds, given_noise, use_given, image_latents,
                    from_image, mask, masked_latents):
  """Noise -> scan of (U-Net, guidance, step, blend) -> VAE decode -> images in [0, 1]."""
  TRACES[sch.name] += 1
  b, k = weights.shape
  shape = given_noise.shape[1:]
  nine = unet.in_channels == 9

  def shard(x):
    if mesh is None:
      return x
    spec = jax.sharding.PartitionSpec(data_axis)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  keys = jax.vmap(jax.random.key)(seeds)

  def draw(i):  # standard normal per image; draw 0 is the initial noise, draw i+1 step i's
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape))(keys)

  noise = shard(jnp.where(use_given, given_noise, draw(0)))
  image_latents, mask = shard(image_latents), shard(mask)
  x = jnp.where(from_image, sch.add_noise_at(state, image_latents, noise, 0),
                noise * sch.init_noise_sigma(state))
  cond = cond.reshape((b * k,) + cond.shape[2:])
  context = jnp.concatenate([uncond, cond]) if guided else cond
  n = state.num_steps

  def body(carry, i):
    x, st = carry
    inp = sch.scale_model_input(st, x, i)
    if nine:
      inp = jnp.concatenate([inp, mask, masked_latents], axis=-1)
    inp = jnp.repeat(inp, k, axis=0)
    if guided:
      inp = jnp.concatenate([inp[::k], inp])
    t = jnp.broadcast_to(st.timesteps[i], (inp.shape[0],))
    out = unet.apply({"params": params["unet"]}, inp, t, context).astype(jnp.float32)
    if guided:
      u, c = out[:b], out[b:].reshape((b, k) + out.shape[1:])
      w = weights.reshape((b, k) + (1,) * len(shape))
      eps = u + guidance * jnp.sum(w * (c - u[:, None]), axis=1)
    else:
      eps = out
    step_noise = draw(i + 1) if sch.is_stochastic else None
    x, st = sch.step(st, eps, i, x, noise=step_noise)
    if not nine:  # RePaint-style blend (diffusers' 4-channel inpainting); mask 1 = generate
      known = sch.add_noise_at(st, image_latents, noise, jnp.minimum(i + 1, n - 1))
      known = jnp.where(i < n - 1, known, image_latents)
      x = (1 - mask) * known + mask * x
    return (shard(x), st), None

  (x, _), _ = jax.lax.scan(body, (x, state), jnp.arange(n))
  images = vae.apply({"params": params["vae"]}, x / scaling_factor, method="decode")
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1)


def pipeline_scheduler_config(config: dict) -> dict:
  """The config as diffusers' txt2img and img2img pipelines fix it up on construction.

  They force `steps_offset` 1 and `clip_sample` false: clipping x0 to [-1, 1] would wreck SD
  latents (range about +-4), and DDIM's class default is true. (diffusers' inpaint pipeline
  forgets clip_sample; medjax turns it off there too.)
  """
  return {**config, "steps_offset": 1, "clip_sample": False}


# -- the public call --------------------------------------------------------------------------


def generate(sd, prompts: str | Sequence[str] | None = None,
             negative_prompts: str | Sequence[str] | None = None, *,
             num_inference_steps: int = 50, guidance_scale: float = 7.5,
             scheduler: str | None = "ddim", height: int | None = None, width: int | None = None,
             seed: int | Sequence[int] = 0, latents=None, image=None, mask=None,
             strength: float = 1.0, eta: float = 0.0, prompt_embeds=None,
             negative_prompt_embeds=None, mesh: jax.sharding.Mesh | None = None,
             data_axis: str = "data") -> np.ndarray:
  """Generates images NHWC float32 in [0, 1]; txt2img, img2img (`image`) or inpainting (`mask`).

  Args:
    sd: a `StableDiffusion`.
    prompts: prompts, each may be composable ("a:0.3 AND b:0.7"); or None with `prompt_embeds`.
    negative_prompts: the unconditional prompts ("" when None), one string for all or one each.
    num_inference_steps: scheduler steps (img2img runs the last `strength` fraction of them).
    guidance_scale: classifier-free guidance scale; <= 1 runs no unconditional pass for plain
      prompts (as diffusers). Traced: changing it does not recompile (crossing 1 switches
      guidance off, which is a second program).
    scheduler: a `schedulers.NAMES` entry, or None for the model's own scheduler config class.
    height, width: pixels, multiples of the VAE factor; default U-Net sample_size * factor.
    seed: an int s (image i uses seed s + i) or one seed per image.
    latents: initial noise NHWC [B, h, w, C], unscaled (diffusers' `latents=`; for img2img and
      inpainting the noise added to the image latents), instead of drawing it from `seed`.
    image: NHWC [B or 1, H, W, 3] (or HWC) in [0, 1]: img2img start, or the image to inpaint.
    mask: [B or 1, H, W(, 1)] in [0, 1], 1 = generate, 0 = keep (binarised at 0.5, as diffusers).
    strength: img2img/inpainting noise strength in [0, 1]; 0 returns `image` unchanged.
    eta: DDIM eta.
    prompt_embeds, negative_prompt_embeds: text embeddings [B, 77, D] instead of prompts.
    mesh, data_axis: shard the batch over this mesh axis (B must divide evenly).

  Raises:
    MedjaxError for bad input, before anything runs.
  """
  sch = schedulers.make_scheduler(scheduler, pipeline_scheduler_config(sd.scheduler_config),
                                  eta=eta)
  n = num_inference_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
    raise MedjaxError(f"num_inference_steps = {n!r}; expected a positive integer")
  if isinstance(guidance_scale, bool) or not isinstance(guidance_scale,
                                                       (int, float, np.integer, np.floating)):
    raise MedjaxError(f"guidance_scale = {guidance_scale!r}; expected a number")

  # Prompts -> parts [B][K] and weights [B, K].
  if prompt_embeds is not None:
    if prompts is not None:
      raise MedjaxError("generate: pass prompts or prompt_embeds, not both")
    prompt_embeds = jnp.asarray(prompt_embeds, jnp.float32)
    if prompt_embeds.ndim != 3:
      raise MedjaxError(f"prompt_embeds: shape {tuple(prompt_embeds.shape)}; expected [B, 77, D]")
    parts = [[("", 1.0)] for _ in range(prompt_embeds.shape[0])]
  else:
    if prompts is None:
      raise MedjaxError("generate: prompts = None; expected a string or a list of strings")
    parts = [parse_prompt(p) for p in _as_list(prompts, "prompts")]
  b, k = len(parts), max(len(p) for p in parts)
  parts = [p + [("", 0.0)] * (k - len(p)) for p in parts]
  weights = np.array([[w for _, w in p] for p in parts], np.float32)
  guided = guidance_scale > 1 or k > 1 or bool(np.any(weights != 1))
  if negative_prompts is None:
    negative_prompts = [""] * b
  negative_prompts = ([negative_prompts] * b if isinstance(negative_prompts, str)
                      else _as_list(negative_prompts, "negative_prompts"))
  if len(negative_prompts) != b:
    raise MedjaxError(f"negative_prompts: {len(negative_prompts)} given for {b} prompts; "
                      "expected one string or one per prompt")
  seeds = _seeds(seed, b)

  # Sizes, image, mask.
  f = sd.vae_scale_factor
  nine = sd.unet.in_channels == 9
  if image is not None:
    image = _image_batch(image, "image", b, 3)
    for name, value in (("height", height), ("width", width)):
      size = image.shape[1] if name == "height" else image.shape[2]
      if value is not None and value != size:
        raise MedjaxError(f"{name} = {value!r} but the image is {image.shape[1]}x"
                          f"{image.shape[2]}; leave it out or match the image")
    height, width = image.shape[1:3]
  default = int(sd.configs["unet"].get("sample_size", 64)) * f
  height = default if height is None else height
  width = default if width is None else width
  for name, value in (("height", height), ("width", width)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0
        or value % f):
      raise MedjaxError(f"{name} = {value!r}; expected a positive multiple of {f}")
  shape = (b, height // f, width // f, sd.latent_channels)
  if mask is not None and image is None:
    raise MedjaxError("generate: mask given without image; inpainting needs both")
  if nine and (image is None or mask is None):
    raise MedjaxError(f"{sd.name}: the U-Net has 9 input channels (an inpainting model); "
                      "pass image= and mask=")
  if mask is not None:
    mask = (_image_batch(mask, "mask", b, 1, size=(height, width)) >= 0.5).astype(np.float32)
  if strength != 1 and image is None:
    raise MedjaxError(f"strength = {strength!r} needs an image (img2img or inpainting)")
  start = schedulers.start_index_for_strength(n, strength)
  if latents is not None:
    latents = np.asarray(latents, np.float32)
    if latents.shape != shape:
      raise MedjaxError(f"latents: shape {latents.shape}; expected {shape} (NHWC noise)")
  if mesh is not None:
    if data_axis not in mesh.axis_names or b % mesh.shape[data_axis]:
      raise MedjaxError(f"mesh axis {data_axis!r}: batch of {b} must divide evenly over it "
                        f"(mesh axes {dict(mesh.shape)})")
  if image is not None and start >= n:
    return np.array(image, np.float32)  # strength 0: nothing to denoise
  state = sch.set_timesteps(n, sample_shape=shape, start_index=start)

  # Encoded inputs (each its own cached jit; the graph below sees arrays only).
  if prompt_embeds is not None:
    cond = prompt_embeds[:, None]
  else:
    cond = sd.encode_prompt([t for p in parts for t, _ in p])
    cond = cond.reshape((b, k) + cond.shape[1:])
  if negative_prompt_embeds is not None:
    uncond = jnp.asarray(negative_prompt_embeds, jnp.float32)
    if uncond.shape != cond[:, 0].shape:
      raise MedjaxError(f"negative_prompt_embeds: shape {tuple(uncond.shape)}; expected "
                        f"{tuple(cond[:, 0].shape)}")
  else:
    uncond = sd.encode_prompt(negative_prompts) if guided else cond[:, 0]
  zeros = np.zeros(shape, np.float32)
  image_latents = zeros if image is None else sd.encode_images(image * 2 - 1)
  masked_latents = np.zeros(shape, np.float32)
  if nine:
    masked_latents = sd.encode_images((image * 2 - 1) * (mask < 0.5))
  mask_latents = (np.ones(shape[:3] + (1,), np.float32) if mask is None
                  else np.ascontiguousarray(mask[:, ::f, ::f]))
  from_image = image is not None and not (mask is not None and strength == 1)
  fn = _graph(sd.unet, sd.vae, sd.scaling_factor, sch, guided, mesh, data_axis)
  images = fn({"unet": sd.params["unet"], "vae": sd.params["vae"]}, state, cond, uncond,
              weights, jnp.float32(guidance_scale), seeds,
              zeros if latents is None else latents, latents is not None, image_latents,
              from_image, mask_latents, masked_latents)
  return np.asarray(images)


def interpolation_row(sd, prompt0: str, prompt1: str, weights: Sequence[float], *, seed: int = 0,
                      **kwargs) -> np.ndarray:
  """Images from `prompt0` to `prompt1` (e.g. healthy -> diseased) with one shared noise."""
  e = sd.encode_prompt([prompt0, prompt1])
  embeds = interpolate_embeddings(e[0], e[1], weights)
  return generate(sd, prompt_embeds=embeds, seed=[seed] * len(weights), **kwargs)
