"""What a run trains and how: trainable/frozen param split, the losses, the train step.

Two objectives share the diffusion loss:
  textual inversion  only the new token-embedding rows are trainable; the step swaps them into
                     the looked-up token embeddings, so the frozen table (every other row) stays
                     bit-identical; `merge` writes them into the table for export.
  unet               the U-Net (and optionally the text encoder) is trainable; the VAE is frozen.
There the VAE never enters the gradient: the loss takes its latent moments (mean, logvar),
computed under stop_gradient in the step (trainer.with_encoder) or beforehand and cached.
A third trains the VAE itself (`vae_loss`: latent diffusion's autoencoder recipe without the
perceptual and GAN terms); the U-Net and text encoder are neither computed nor changed.
All three share one step (`make_train_step`: noise drawn per step, EMA, gradient accumulation).
"""
import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import schedulers
from medjax.errors import MedjaxError
from medjax.models import clip

KINDS = ("textual_inversion", "unet", "vae")
# The VAE's params by the half they belong to (what config.vae.train_encoder/decoder pick).
VAE_PARTS = {"encoder": ("encoder", "quant_conv"), "decoder": ("decoder", "post_quant_conv")}


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds; `rng` is the run's base key (each step folds in `step`)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Trainable:
  """Which params a run trains, and how they merge back into the full pipeline params."""
  kind: str
  token_ids: tuple = ()  # textual inversion: rows of the token-embedding table
  train_text_encoder: bool = False
  vae_parts: tuple = ("encoder", "decoder")  # vae: the halves it trains (VAE_PARTS)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise MedjaxError(f"config.objective={self.kind!r}: expected one of {list(KINDS)}")
    if self.kind == "textual_inversion" and not self.token_ids:
      raise MedjaxError("textual inversion needs at least one placeholder token")
    if self.kind == "vae" and not self.vae_parts:
      raise MedjaxError("config.vae.train_encoder and config.vae.train_decoder are both False: "
                        "nothing to train")
    if set(self.vae_parts) - set(VAE_PARTS):
      raise ValueError(f"vae_parts={self.vae_parts!r}: expected parts of {list(VAE_PARTS)}")

  def split(self, params: dict) -> tuple[dict, dict]:
    """Full params {'unet', 'vae', 'text_encoder'} -> (trainable, frozen)."""
    if self.kind == "textual_inversion":
      table = clip.token_embedding_table(params["text_encoder"])
      rows = jnp.asarray(table)[np.asarray(self.token_ids)]
      return {"embeddings": rows}, dict(params)
    if self.kind == "vae":  # (also splits a tree of logical axes: only its keys matter)
      names = [n for part in self.vae_parts for n in VAE_PARTS[part] if n in params["vae"]]
      return ({"vae": {k: params["vae"][k] for k in names}},
              {**params, "vae": {k: v for k, v in params["vae"].items() if k not in names}})
    names = ("unet", "text_encoder") if self.train_text_encoder else ("unet",)
    return ({k: params[k] for k in names}, {k: v for k, v in params.items() if k not in names})

  def merge(self, trainable: dict, frozen: dict) -> dict:
    if self.kind == "textual_inversion":
      table = clip.token_embedding_table(frozen["text_encoder"])
      rows = trainable["embeddings"].astype(table.dtype)
      table = table.at[np.asarray(self.token_ids)].set(rows)
      text_encoder = clip.replace_token_embedding_table(frozen["text_encoder"], table)
      return {**frozen, "text_encoder": text_encoder}
    if self.kind == "vae":
      return {**frozen, "vae": {**frozen["vae"], **trainable["vae"]}}
    return {**frozen, **trainable}

  def text_inputs(self, trainable: dict, frozen: dict, input_ids: jax.Array
                  ) -> tuple[dict, jax.Array | None]:
    """(params, token_embeds) for the loss. Textual inversion looks the frozen table up and
    swaps in its trainable rows where the prompt holds a placeholder id, so neither the forward
    nor the gradient ever builds a vocabulary-sized array; the result equals `merge`'s table."""
    if self.kind != "textual_inversion":
      return self.merge(trainable, frozen), None
    table = clip.token_embedding_table(frozen["text_encoder"])
    slots = np.full((max(table.shape[0], max(self.token_ids) + 1),), -1, np.int32)
    slots[np.asarray(self.token_ids)] = np.arange(len(self.token_ids))
    slot = jnp.asarray(slots)[input_ids]
    rows = trainable["embeddings"].astype(table.dtype)[jnp.maximum(slot, 0)]
    embeds = jnp.where((slot >= 0)[..., None], rows, jnp.take(table, input_ids, axis=0))
    return frozen, embeds

  def decay_mask(self, trainable: dict) -> Any:
    """Weight decay on kernels only: never on embeddings, biases or norms."""
    def mask(path, leaf):
      names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
      return names[-1] == "kernel" and np.ndim(leaf) >= 2
    return jax.tree_util.tree_map_with_path(mask, trainable)


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Linear warmup, then 'constant', 'cosine' or 'linear' decay to 0 at total_steps."""
  lr, warmup, total = float(config.learning_rate), int(config.warmup_steps), int(config.total_steps)
  kind = config.lr_schedule
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  elif kind == "linear":
    decay = optax.linear_schedule(lr, 0.0, max(total - warmup, 1))
  else:
    raise MedjaxError(f"config.lr_schedule={kind!r}: expected constant, cosine or linear")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(config: Any, trainable: Trainable, params: dict) -> optax.GradientTransformation:
  """AdamW (decay masked to kernels), with global-norm clipping when max_grad_norm > 0."""
  parts = []
  if config.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                           eps=config.adam_eps, weight_decay=config.weight_decay,
                           mask=trainable.decay_mask(params)))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The numbers of the diffusion loss (from the config and the scheduler config)."""
  prediction_type: str = "epsilon"
  min_snr_gamma: float = 0.0  # 0 = off; 5 as Hang et al. suggest
  prior_loss_weight: float = 1.0
  scaling_factor: float = 0.18215
  noise_offset: float = 0.0


def draw_noise(batch: dict, key: jax.Array, num_train_timesteps: int, lc: LossConfig) -> dict:
  """The step's randomness for the whole batch, drawn before any split into micro-batches, so
  gradient accumulation computes exactly what one big batch would."""
  k_latent, k_noise, k_t, k_offset = jax.random.split(key, 4)
  shape = batch["moments"].shape[:-1] + (batch["moments"].shape[-1] // 2,)
  noise = jax.random.normal(k_noise, shape)
  if lc.noise_offset:
    noise = noise + lc.noise_offset * jax.random.normal(k_offset, (shape[0], 1, 1, shape[-1]))
  return {**batch, "latent_noise": jax.random.normal(k_latent, shape), "noise": noise,
          "t": jax.random.randint(k_t, (shape[0],), 0, num_train_timesteps)}


def example_weights(batch: dict, lc: LossConfig) -> jax.Array:
  """Per-example loss weights summing to the DreamBooth loss instance + w * prior, where each
  part is a mean over its own examples (prior [B]: 1 for class images)."""
  b = batch["moments"].shape[0]
  prior = batch.get("prior", jnp.zeros((b,), jnp.float32)).astype(jnp.float32)
  return ((1 - prior) / jnp.maximum(jnp.sum(1 - prior), 1)
          + lc.prior_loss_weight * prior / jnp.maximum(jnp.sum(prior), 1))


def diffusion_loss(unet, text_encoder, alphas_cumprod, lc: LossConfig, params: dict,
                   batch: dict, token_embeds: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Weighted squared error of the U-Net's prediction (epsilon or v) at the drawn timesteps.

  batch: moments [B, h, w, 2C] (VAE mean and logvar), input_ids [B, 77], the draws of
  `draw_noise`, weight [B] (`example_weights`) and prior [B]. Returns the weighted sum, so
  micro-batch losses add up to the batch loss.
  """
  mean, logvar = jnp.split(batch["moments"].astype(jnp.float32), 2, axis=-1)
  latents = (mean + jnp.exp(0.5 * logvar) * batch["latent_noise"]) * lc.scaling_factor
  noise, t = batch["noise"], batch["t"]
  acp = alphas_cumprod[t][:, None, None, None]
  noisy = jnp.sqrt(acp) * latents + jnp.sqrt(1 - acp) * noise
  context = text_encoder.apply({"params": params["text_encoder"]}, batch["input_ids"],
                               token_embeds)[0]
  pred = unet.apply({"params": params["unet"]}, noisy, t, context).astype(jnp.float32)
  if lc.prediction_type == "epsilon":
    target = noise
  elif lc.prediction_type == "v_prediction":
    target = jnp.sqrt(acp) * noise - jnp.sqrt(1 - acp) * latents
  else:
    raise MedjaxError(f"prediction_type={lc.prediction_type!r}: expected epsilon or "
                      "v_prediction")
  per_example = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
  if lc.min_snr_gamma > 0:
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    clipped = jnp.minimum(snr, lc.min_snr_gamma)
    per_example = per_example * (clipped / (snr + 1) if lc.prediction_type == "v_prediction"
                                 else clipped / snr)
  prior = batch.get("prior", jnp.zeros_like(per_example)).astype(jnp.float32)
  weight = batch["weight"]
  return jnp.sum(weight * per_example), {
      "instance_loss": jnp.sum(weight * per_example * (1 - prior)),
      "prior_loss": jnp.sum(weight * per_example * prior) / lc.prior_loss_weight
      if lc.prior_loss_weight else jnp.zeros(())}


@dataclasses.dataclass(frozen=True)
class VaeLossConfig:
  """The numbers of the VAE loss (config.vae)."""
  loss: str = "l1"  # 'l1' (latent diffusion's) | 'l2'
  kl_weight: float = 1e-6  # latent diffusion's kl-f8


def vae_loss(vae, lc: VaeLossConfig, vae_params: dict, batch: dict) -> tuple[jax.Array, dict]:
  """Latent diffusion's autoencoder loss (`LPIPSWithDiscriminator` with its learned log-variance
  at 0, no perceptual and no GAN term) divided by the pixel values per image (3HW), so it reads
  as a per-pixel mean; Adam does not see the scale. Per image:

    rec = mean |x - D(z)| ('l1') or mean (x - D(z))^2 ('l2'),  z = mean + std * latent_noise
    kl  = diffusers' `DiagonalGaussianDistribution.kl()`: 0.5 sum(mean^2 + var - 1 - logvar)
    loss = rec + kl_weight * kl / (3HW)

  batch: image [B, H, W, 3] in [-1, 1], latent_noise [B, h, w, C], weight [B]. Returns the
  weighted sum (micro-batches add up); aux: rec_loss, kl and psnr (dB, of the [0, 1] images,
  the reconstruction clipped) as weighted sums too.
  """
  x = batch["image"].astype(jnp.float32)
  mean, logvar = vae.apply({"params": vae_params}, x, method="encode")
  z = mean + jnp.exp(0.5 * logvar) * batch["latent_noise"]
  rec = vae.apply({"params": vae_params}, z, method="decode").astype(jnp.float32)
  diff = x - rec
  if lc.loss == "l1":
    per_pixel = jnp.abs(diff)
  elif lc.loss == "l2":
    per_pixel = jnp.square(diff)
  else:
    raise MedjaxError(f"config.vae.loss={lc.loss!r}: expected 'l1' or 'l2'")
  rec_loss = jnp.mean(per_pixel, axis=(1, 2, 3))
  kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  per_example = rec_loss + lc.kl_weight * kl / (x.shape[1] * x.shape[2] * x.shape[3])
  mse = jnp.mean(jnp.square((x + 1) / 2 - jnp.clip((rec + 1) / 2, 0.0, 1.0)), axis=(1, 2, 3))
  psnr = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
  w = batch["weight"]
  return jnp.sum(w * per_example), {"rec_loss": jnp.sum(w * rec_loss), "kl": jnp.sum(w * kl),
                                    "psnr": jnp.sum(w * psnr)}


def draw_latent_noise(batch: dict, key: jax.Array, factor: int, channels: int) -> dict:
  """The VAE step's posterior-sample noise for the whole batch (before any micro-batch split),
  and equal example weights."""
  b, h, w, _ = batch["image"].shape
  return {**batch, "latent_noise": jax.random.normal(key, (b, h // factor, w // factor, channels)),
          "weight": jnp.full((b,), 1.0 / b, jnp.float32)}


def init_state(trainable_params: dict, optimizer: optax.GradientTransformation, seed: int,
               ema: bool) -> TrainState:
  params = jax.tree.map(jnp.asarray, trainable_params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                    rng=jax.random.PRNGKey(seed))


def make_train_step(sd, trainable: Trainable, optimizer: optax.GradientTransformation,
                    lc: LossConfig | VaeLossConfig, *, grad_accum: int = 1, ema_decay: float = 0.0,
                    schedule: optax.Schedule | None = None) -> Callable:
  """A pure `(state, frozen, batch) -> (state, metrics)`; jit it with shardings (trainer.py).

  metrics: loss, grad_norm, the loss's aux (instance_loss and prior_loss, or for the VAE
  rec_loss, kl and psnr), learning_rate (with `schedule`) and `finite` (a bool: loss and new
  params all finite).

  `grad_accum` > 1 splits the batch into that many micro-batches (a `lax.scan`) and sums their
  weighted gradients: one optimizer update per call, the same as one big batch.
  """
  if trainable.kind == "vae":
    def loss_fn(params, frozen, batch):
      return vae_loss(sd.vae, lc, trainable.merge(params, frozen)["vae"], batch)

    def prepare(batch, key):
      return draw_latent_noise(batch, key, sd.vae_scale_factor, sd.latent_channels)
  else:
    alphas_cumprod = jnp.asarray(_alphas_cumprod(sd), jnp.float32)

    def loss_fn(params, frozen, batch):
      full, token_embeds = trainable.text_inputs(params, frozen, batch["input_ids"])
      return diffusion_loss(sd.unet, sd.text_encoder, alphas_cumprod, lc, full, batch,
                            token_embeds)

    def prepare(batch, key):
      batch = draw_noise(batch, key, alphas_cumprod.shape[0], lc)
      return {**batch, "weight": example_weights(batch, lc)}

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, frozen: dict, batch: dict):
    batch = prepare(batch, jax.random.fold_in(state.rng, state.step))
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, frozen, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

      def body(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(state.params, frozen, mb)), None

      shapes = jax.eval_shape(grad_fn, state.params, frozen, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      # diffusers' EMAModel: decay 0 on the first update (EMA = params), then
      # (1 + s) / (10 + s) capped at ema_decay, s = updates done before this one.
      s = state.step.astype(jnp.float32)
      d = jnp.where(s <= 0, 0.0, jnp.minimum(ema_decay, (1.0 + s) / (10.0 + s)))
      ema_params = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params, params)
    # Whether the loss and the new params are finite: one cheap reduction here, read on the
    # host only at log and checkpoint steps, so a checkpoint never holds non-finite params.
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(params):
      finite = finite & jnp.all(jnp.isfinite(leaf))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite, **aux}
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      ema_params=ema_params, rng=state.rng), metrics

  return step


def _alphas_cumprod(sd) -> np.ndarray:
  return schedulers.make_scheduler("ddpm", sd.scheduler_config).alphas_cumprod
