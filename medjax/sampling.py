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
import dataclasses
import functools
import re
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medjax import hosts
from medjax import schedulers
from medjax import validation
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


@dataclasses.dataclass(frozen=True)
class Request:
  """`generate`'s arguments checked and normalised on the host, before anything is encoded."""
  scheduler: schedulers.Scheduler  # its config fixed up as diffusers' pipelines do
  steps: int  # num_inference_steps
  guidance_scale: float
  parts: list[list[tuple[str, float]]]  # [B][K] (text, weight), padded with ("", 0)
  weights: np.ndarray  # [B, K] float32, the parts' weights
  guided: bool  # whether an unconditional pass runs
  negative_prompts: list[str]  # B of them
  prompt_embeds: jax.Array | None  # [B, 77, D] given instead of prompts (parts' texts are "")
  seeds: np.ndarray  # [B] uint32
  shape: tuple[int, int, int, int]  # latents (B, h, w, C)
  image: np.ndarray | None  # [B, H, W, 3] in [0, 1]
  mask: np.ndarray | None  # [B, H, W, 1] in {0, 1}, 1 = generate
  latents: np.ndarray | None  # given initial noise `shape`; None: drawn from the seeds
  start: int  # first scheduler step (img2img); `steps`: nothing to denoise
  strength: float
  mesh: jax.sharding.Mesh | None  # None: not sharded
  data_axis: str


def _as_list(value, name) -> list[str]:
  values = [value] if isinstance(value, str) else list(value)
  if not values or not all(isinstance(v, str) for v in values):
    raise MedjaxError(f"{name} = {value!r}: expected a string or a non-empty list of strings")
  return values


def _check_steps_and_scale(n, guidance_scale, sch: schedulers.Scheduler) -> None:
  """Steps within the scheduler's training steps; a finite guidance scale >= 0 (NaN would
  silently switch guidance off, inf give black images, and a negative scale on a plain prompt
  is no guidance under another name: anti-guidance is a negative composable-prompt weight)."""
  if not validation.is_int(n) or n <= 0:
    raise MedjaxError(f"num_inference_steps = {n!r}; expected a positive integer")
  if n > sch.num_train_timesteps:
    raise MedjaxError(f"num_inference_steps = {n}; expected at most the scheduler's "
                      f"num_train_timesteps = {sch.num_train_timesteps}")
  if not validation.is_number(guidance_scale) or not np.isfinite(guidance_scale):
    raise MedjaxError(f"guidance_scale = {guidance_scale!r}; expected a finite number")
  if guidance_scale < 0:
    raise MedjaxError(f"guidance_scale = {guidance_scale!r}; expected >= 0 (for anti-guidance "
                      "give a prompt part a negative weight, 'a AND b:-0.5')")


def _prompt_parts(prompts, prompt_embeds):
  """(parts [B][K] padded with ("", 0), weights [B, K], prompt_embeds as float32 or None)."""
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
  k = max(len(p) for p in parts)
  parts = [p + [("", 0.0)] * (k - len(p)) for p in parts]
  weights = np.array([[w for _, w in p] for p in parts], np.float32)
  return parts, weights, prompt_embeds


def _negative_prompts(negative_prompts, batch: int) -> list[str]:
  if negative_prompts is None:
    return [""] * batch
  negatives = ([negative_prompts] * batch if isinstance(negative_prompts, str)
               else _as_list(negative_prompts, "negative_prompts"))
  if len(negatives) != batch:
    raise MedjaxError(f"negative_prompts: {len(negatives)} given for {batch} prompts; "
                      "expected one string or one per prompt")
  return negatives


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


def default_size(sd) -> tuple[int, int]:
  """(height, width) in pixels: the U-Net's sample_size (an int, [h, w], or null for 64)
  times the VAE factor, as diffusers' pipelines default it."""
  size = sd.configs["unet"].get("sample_size") or 64
  h, w = (size, size) if validation.is_int(size) else size
  return int(h) * sd.vae_scale_factor, int(w) * sd.vae_scale_factor


def _image_size(sd, image, height, width) -> tuple[int, int]:
  """(height, width) in pixels: the image's, else the U-Net's sample_size times the VAE factor."""
  f = sd.vae_scale_factor
  if image is not None:
    for name, value, size in (("height", height, image.shape[1]),
                              ("width", width, image.shape[2])):
      if value is not None and value != size:
        raise MedjaxError(f"{name} = {value!r} but the image is {image.shape[1]}x"
                          f"{image.shape[2]}; leave it out or match the image")
    height, width = image.shape[1:3]
  default = default_size(sd)
  height = default[0] if height is None else height
  width = default[1] if width is None else width
  for name, value in (("height", height), ("width", width)):
    if not validation.is_int(value) or value <= 0 or value % f:
      raise MedjaxError(f"{name} = {value!r}; expected a positive multiple of {f}")
  return height, width


def _mask(sd, mask, image, batch: int, size: tuple[int, int]) -> np.ndarray | None:
  """The inpainting mask binarised at 0.5 (as diffusers), [B, H, W, 1]; None for no mask."""
  if mask is not None and image is None:
    raise MedjaxError("generate: mask given without image; inpainting needs both")
  if sd.unet.in_channels == 9 and (image is None or mask is None):
    raise MedjaxError(f"{sd.name}: the U-Net has 9 input channels (an inpainting model); "
                      "pass image= and mask=")
  if mask is None:
    return None
  return (_image_batch(mask, "mask", batch, 1, size=size) >= 0.5).astype(np.float32)


def _start(n: int, strength, image) -> int:
  if strength != 1 and image is None:
    raise MedjaxError(f"strength = {strength!r} needs an image (img2img or inpainting)")
  return schedulers.start_index_for_strength(n, strength)


def _latents(latents, shape) -> np.ndarray | None:
  if latents is None:
    return None
  latents = np.asarray(latents, np.float32)
  if latents.shape != shape:
    raise MedjaxError(f"latents: shape {latents.shape}; expected {shape} (NHWC noise)")
  return latents


def _check_mesh(mesh, data_axis: str, batch: int) -> None:
  if mesh is not None and (data_axis not in mesh.axis_names or batch % mesh.shape[data_axis]):
    raise MedjaxError(f"mesh axis {data_axis!r}: batch of {batch} must divide evenly over it "
                      f"(mesh axes {dict(mesh.shape)})")


def check_request(sd, prompts, negative_prompts, *, num_inference_steps, guidance_scale,
                  scheduler, height, width, seed, latents, image, mask, strength, eta,
                  prompt_embeds, mesh, data_axis) -> Request:
  """`generate`'s arguments (see there) checked in order, as a `Request`.

  Raises:
    MedjaxError naming the first bad argument.
  """
  sch = schedulers.make_scheduler(scheduler, pipeline_scheduler_config(sd.scheduler_config),
                                  eta=eta)
  n = num_inference_steps
  _check_steps_and_scale(n, guidance_scale, sch)
  parts, weights, prompt_embeds = _prompt_parts(prompts, prompt_embeds)
  b, k = weights.shape
  guided = guidance_scale > 1 or k > 1 or bool(np.any(weights != 1))
  negatives = _negative_prompts(negative_prompts, b)
  seeds = _seeds(seed, b)
  if image is not None:
    image = _image_batch(image, "image", b, 3)
  height, width = _image_size(sd, image, height, width)
  f = sd.vae_scale_factor
  shape = (b, height // f, width // f, sd.latent_channels)
  mask = _mask(sd, mask, image, b, (height, width))
  start = _start(n, strength, image)
  latents = _latents(latents, shape)
  _check_mesh(mesh, data_axis, b)
  return Request(scheduler=sch, steps=n, guidance_scale=guidance_scale, parts=parts,
                 weights=weights, guided=guided, negative_prompts=negatives,
                 prompt_embeds=prompt_embeds, seeds=seeds, shape=shape, image=image, mask=mask,
                 latents=latents, start=start, strength=strength, mesh=mesh,
                 data_axis=data_axis)


# -- the compiled graph -----------------------------------------------------------------------


@flax.struct.dataclass
class GraphInputs:
  """Everything the compiled graph reads besides the weights.

  The arrays are traced, so a new prompt, seed, guidance scale, image or mask reuses the
  compiled program; the static fields (with the array shapes) select the program.

  Attributes:
    state: the scheduler state from `set_timesteps`.
    cond: [B, K, 77, D] text embeddings of each prompt's K parts.
    uncond: [B, 77, D] the negative prompts' embeddings (cond[:, 0] when not guided).
    weights: [B, K] the parts' weights.
    guidance: () float32 guidance scale.
    seeds: [B] uint32; draw 0 of image i is its initial noise, draw s + 1 step s's noise.
    given_noise: [B, h, w, C] initial noise when `use_given` (zeros otherwise).
    use_given: () bool, start from `given_noise` instead of the seeds' draw.
    image_latents: [B, h, w, C] the VAE latents of the image (zeros for txt2img).
    from_image: () bool, start from `image_latents` noised to the first step (img2img).
    mask: [B, h, w, 1] 1 = generate, 0 = keep `image_latents` (all ones without a mask).
    masked_latents: [B, h, w, C] latents of the masked image, the 9-channel U-Net's input.
    scheduler, guided, mesh, data_axis: static; see `Request`.
  """
  state: schedulers.SchedulerState
  cond: jax.Array
  uncond: jax.Array
  weights: np.ndarray
  guidance: jax.Array
  seeds: np.ndarray
  given_noise: np.ndarray
  use_given: bool
  image_latents: jax.Array
  from_image: bool
  mask: np.ndarray
  masked_latents: jax.Array
  scheduler: schedulers.Scheduler = flax.struct.field(pytree_node=False)
  guided: bool = flax.struct.field(pytree_node=False)
  mesh: jax.sharding.Mesh | None = flax.struct.field(pytree_node=False)
  data_axis: str = flax.struct.field(pytree_node=False)


def graph_inputs(sd, req: Request, negative_prompt_embeds=None) -> GraphInputs:
  """The request's prompts and images encoded (each encoder its own cached jit) for the graph.

  Raises:
    MedjaxError if `negative_prompt_embeds` does not match the prompts' embeddings.
  """
  b, k = req.weights.shape
  shape, image, mask = req.shape, req.image, req.mask
  state = req.scheduler.set_timesteps(req.steps, sample_shape=shape, start_index=req.start)
  if req.prompt_embeds is not None:
    cond = req.prompt_embeds[:, None]
  else:
    cond = sd.encode_prompt([t for p in req.parts for t, _ in p])
    cond = cond.reshape((b, k) + cond.shape[1:])
  if negative_prompt_embeds is not None:
    uncond = jnp.asarray(negative_prompt_embeds, jnp.float32)
    if uncond.shape != cond[:, 0].shape:
      raise MedjaxError(f"negative_prompt_embeds: shape {tuple(uncond.shape)}; expected "
                        f"{tuple(cond[:, 0].shape)}")
  else:
    uncond = sd.encode_prompt(req.negative_prompts) if req.guided else cond[:, 0]
  zeros = np.zeros(shape, np.float32)
  image_latents = zeros if image is None else sd.encode_images(image * 2 - 1)
  masked_latents = np.zeros(shape, np.float32)
  if sd.unet.in_channels == 9:
    masked_latents = sd.encode_images((image * 2 - 1) * (mask < 0.5))
  f = sd.vae_scale_factor
  mask_latents = (np.ones(shape[:3] + (1,), np.float32) if mask is None
                  else np.ascontiguousarray(mask[:, ::f, ::f]))
  return GraphInputs(
      state=state, cond=cond, uncond=uncond, weights=req.weights,
      guidance=jnp.float32(req.guidance_scale), seeds=req.seeds,
      given_noise=zeros if req.latents is None else req.latents,
      use_given=req.latents is not None, image_latents=image_latents,
      from_image=image is not None and not (mask is not None and req.strength == 1),
      mask=mask_latents, masked_latents=masked_latents, scheduler=req.scheduler,
      guided=req.guided, mesh=req.mesh, data_axis=req.data_axis)


@functools.lru_cache(maxsize=64)
def _graph(unet, vae, scaling_factor: float):
  """The jitted generation function (cached by architecture; jax retraces for new shapes and
  static `GraphInputs` fields).

  Keyed on the (hashable, stateless) modules rather than the model object, so the cache holds
  no params and models of one architecture share compiled programs.
  """
  return jax.jit(functools.partial(_generate_graph, unet, vae, scaling_factor))


def _generate_graph(unet, vae, scaling_factor, params, inputs: GraphInputs):
  """Noise -> scan of (U-Net, guidance, step, blend) -> VAE decode -> images in [0, 1]."""
  sch, guided, mesh = inputs.scheduler, inputs.guided, inputs.mesh
  state, weights, guidance = inputs.state, inputs.weights, inputs.guidance
  image_latents, mask = inputs.image_latents, inputs.mask
  TRACES[sch.name] += 1
  b, k = weights.shape
  shape = inputs.given_noise.shape[1:]
  nine = unet.in_channels == 9

  def shard(x):
    if mesh is None:
      return x
    spec = jax.sharding.PartitionSpec(inputs.data_axis)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  keys = jax.vmap(jax.random.key)(inputs.seeds)

  def draw(i):  # standard normal per image; draw 0 is the initial noise, draw i+1 step i's
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), shape))(keys)

  noise = shard(jnp.where(inputs.use_given, inputs.given_noise, draw(0)))
  image_latents, mask = shard(image_latents), shard(mask)
  x = jnp.where(inputs.from_image, sch.add_noise_at(state, image_latents, noise, 0),
                noise * sch.init_noise_sigma(state))
  cond = inputs.cond.reshape((b * k,) + inputs.cond.shape[2:])
  context = jnp.concatenate([inputs.uncond, cond]) if guided else cond
  n = state.num_steps

  def body(carry, i):
    x, st = carry
    inp = sch.scale_model_input(st, x, i)
    if nine:
      inp = jnp.concatenate([inp, mask, inputs.masked_latents], axis=-1)
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
    mesh, data_axis: shard the batch over this mesh axis (B must divide evenly). The mesh may
      span several processes: then every process calls `generate` with the same arguments and
      gets all B images.

  Raises:
    MedjaxError for bad input, before anything runs.
  """
  req = check_request(sd, prompts, negative_prompts, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, scheduler=scheduler, height=height,
                      width=width, seed=seed, latents=latents, image=image, mask=mask,
                      strength=strength, eta=eta, prompt_embeds=prompt_embeds, mesh=mesh,
                      data_axis=data_axis)
  if req.image is not None and req.start >= req.steps:
    return np.array(req.image, np.float32)  # strength 0: nothing to denoise
  inputs = graph_inputs(sd, req, negative_prompt_embeds)
  fn = _graph(sd.unet, sd.vae, sd.scaling_factor)
  images = fn({"unet": sd.params["unet"], "vae": sd.params["vae"]}, inputs)
  return hosts.to_host(images)  # with a multi-process mesh: gathered on every process



def interpolation_row(sd, prompt0: str, prompt1: str, weights: Sequence[float], *, seed: int = 0,
                      **kwargs) -> np.ndarray:
  """Images from `prompt0` to `prompt1` (e.g. healthy -> diseased) with one shared noise."""
  e = sd.encode_prompt([prompt0, prompt1])
  embeds = interpolate_embeddings(e[0], e[1], weights)
  return generate(sd, prompt_embeds=embeds, seed=[seed] * len(weights), **kwargs)
