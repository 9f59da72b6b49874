"""The base train config: every key a run may set, with defaults for the embedded tiny model.

Config files under `configs/` start from `base_config()` and change values; a key that is not
here is an error (`check_train_config`), as is an override of an unknown key on the command line.
"""
import json
from typing import Any

import ml_collections

from medjax import sharding
from medjax.data.defaults import default_config as data_config
from medjax.data.skips import check_fraction
from medjax.errors import MedjaxError
from medjax.models import attention as attention_lib
from medjax.validation import check_known_keys

# Keys that may differ between a run and the checkpoints in its workdir (they don't change what
# the steps compute): a resumed run may extend total_steps or log/save at other intervals.
RESUMABLE_KEYS = ("total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                  "sample_every_steps", "sample", "allow_config_change", "progress_bar",
                  "stop_after_steps", "attention", "protocol")
# Free-form maps: their keys are names chosen by the user, not config keys.
FREE_MAPS = ("data.prompt.class_prompts", "data.prompt.label_texts")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "unet"  # 'unet' (fine-tune) | 'textual_inversion' | 'vae'
  # '' | 'paper_a' | 'paper_b': the paper whose protocol a `:paper` config follows; its
  # settings' sources (medjax.eval.provenance) then go into summary.json
  c.protocol = ""
  c.seed = 0
  c.total_steps = 60
  c.stop_after_steps = 0  # stop (with a checkpoint) after this many steps of this process; 0=off
  c.batch_size = 4  # global, over all devices and processes (plus as many prior images)
  c.grad_accum = 1  # micro-batches per optimizer step (batch_size must divide)
  c.resolution = 64  # image side in pixels (the embedded model: 64 -> 8x8 latents)

  c.learning_rate = 1e-4
  c.lr_schedule = "constant"  # 'constant' | 'cosine' | 'linear' (after warmup, down to 0)
  c.warmup_steps = 0
  c.weight_decay = 1e-2  # AdamW, kernels only (never embeddings, biases, norms)
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.max_grad_norm = 1.0  # global-norm clipping; 0 = off
  c.ema_decay = 0.0  # EMA of trained params (e.g. 0.9999); 0 = off
  c.min_snr_gamma = 0.0  # min-SNR loss weighting (5.0 is usual); 0 = off
  c.noise_offset = 0.0

  c.mixed_precision = "fp32"  # 'fp32' | 'bf16' (bf16 compute, fp32 params and optimizer)
  c.remat = False  # recompute U-Net/VAE/CLIP blocks in the backward pass (less memory)
  c.attention = "auto"  # 'auto' | 'xla' | 'blocked' | 'cudnn' | 'pallas_tpu' (models/attention.py)
  c.cache_latents = False  # encode each image once (needs a deterministic pipeline: no flips)

  c.checkpoint_every_steps = 20
  c.keep_checkpoints = 3
  c.log_every_steps = 10
  c.sample_every_steps = 0  # sample grids every K steps (0: only at the end)
  c.progress_bar = True
  c.allow_config_change = False  # resume a workdir whose checkpoints came from another config

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ()  # a tuple of prompts; () = one per class prompt of the data config
  c.sample.num_per_prompt = 2
  c.sample.num_inference_steps = 20
  c.sample.guidance_scale = 7.5
  c.sample.scheduler = "ddim"
  c.sample.seed = 0
  c.sample.num_reconstructions = 8  # vae: held-out images in each originals|reconstructions grid

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.rules = tuple(tuple(r) for r in sharding.DEFAULT_RULES)  # logical name -> mesh axis

  c.model = ml_collections.ConfigDict()
  # a diffusers directory (PyTorch or old Flax weights), a single-file checkpoint, or a Hugging
  # Face id in the local cache (medjax.convert.sources); '' = the embedded tiny SD
  c.model.pretrained = ""
  c.model.variant = ""  # weight variant, e.g. 'fp16'
  c.model.allow_pickle = False  # read a .ckpt/.pt pretrained (torch.load(weights_only=True))
  # '' pretrained: the shipped phantom-trained tiny SD, or with embedded_random=True the same
  # model with random weights drawn from embedded_seed
  c.model.embedded_random = False
  c.model.embedded_seed = 0

  c.textual_inversion = ml_collections.ConfigDict()
  # (('<token>', 'initializer words'), ...): each token gets num_vectors rows, initialised
  # from the embeddings of the words' tokens (cycled).
  c.textual_inversion.tokens = ()
  c.textual_inversion.num_vectors = 64

  c.unet = ml_collections.ConfigDict()
  c.unet.train_text_encoder = False
  # share of prompts replaced by '' (classifier-free guidance training, as SD's 10%); 0 = off
  c.unet.uncond_prob = 0.0

  # objective='vae': latent diffusion's autoencoder loss (no perceptual or GAN term)
  c.vae = ml_collections.ConfigDict()
  c.vae.loss = "l1"  # 'l1' | 'l2' reconstruction loss on the decoded posterior sample
  c.vae.kl_weight = 1e-6  # KL(posterior || N(0, I)) weight, latent diffusion's kl-f8
  c.vae.train_encoder = True  # encoder + quant_conv
  c.vae.train_decoder = True  # decoder + post_quant_conv

  c.prior = ml_collections.ConfigDict()
  c.prior.enabled = False  # DreamBooth prior preservation
  c.prior.weight = 1.0
  c.prior.class_prompt = "a chest x-ray"
  c.prior.num_class_images = 8  # generated by the frozen model into workdir/class_images
  c.prior.class_images_dir = ""  # or given: a folder of PNG/JPEG images
  c.prior.num_inference_steps = 20
  c.prior.guidance_scale = 7.5

  c.data = data_config()
  return c


def unet_paper_scale(c: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """Full U-Net fine-tuning of a real SD at 512 px: batch 32, lr 5e-6 (diffusers' recipe range)
  after 500 warmup steps, bf16 compute, remat, EMA, latents cached."""
  c.resolution = 512
  c.total_steps = 20_000
  c.batch_size = 32
  c.learning_rate = 5e-6
  c.lr_schedule, c.warmup_steps = "constant", 500
  c.max_grad_norm = 1.0
  c.mixed_precision = "bf16"
  c.remat = True
  c.ema_decay = 0.9999
  c.cache_latents = True
  c.checkpoint_every_steps, c.log_every_steps, c.sample_every_steps = 1000, 50, 2000
  c.data.source = source
  c.data.on_bad_file = "skip"
  return c


def ti_paper_scale(c: ml_collections.ConfigDict, source: str,
                   total_steps: int) -> ml_collections.ConfigDict:
  """Paper A's textual inversion at 512 px: 100 images per class, batch 1 on one device (the
  web UI's default), latents cached."""
  c.resolution = 512
  c.total_steps = total_steps
  c.batch_size = 1
  c.mesh.data, c.mesh.fsdp = 1, 1
  c.data.source = source
  c.data.per_class = 100
  c.cache_latents = True
  c.checkpoint_every_steps, c.log_every_steps = 1000, 100
  c.sample_every_steps = total_steps // 10
  return c


def vae_paper_scale(c: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """Fine-tuning a real SD's VAE at 512 px: the decoder only (as Stability's sd-vae-ft-mse; the
  latents the U-Net knows stay put), batch 16, lr 1e-5 after 500 warmup steps, EMA, bf16, remat.
  Our settings: neither paper fine-tunes the VAE."""
  c.objective = "vae"
  c.resolution = 512
  c.total_steps = 20_000
  c.batch_size = 16
  c.learning_rate = 1e-5
  c.lr_schedule, c.warmup_steps = "constant", 500
  c.max_grad_norm = 1.0
  c.mixed_precision = "bf16"
  c.remat = True
  c.ema_decay = 0.9999
  c.vae.train_encoder = False
  c.checkpoint_every_steps, c.log_every_steps, c.sample_every_steps = 1000, 50, 2000
  c.sample.num_reconstructions = 8
  c.data.source = source
  c.data.on_bad_file = "skip"
  return c


def vae_recipe(c: ml_collections.ConfigDict, source: str, *, paper: bool,
               full: bool) -> ml_collections.ConfigDict:
  """configs/{cxr,mri}_vae.py: the tiny VAE from random weights (1,000 steps at batch 8, lr 1e-3
  cosine), or `vae_paper_scale` on `source`; `full` also trains the encoder."""
  c.objective = "vae"
  c.model.embedded_random = True  # not the shipped VAE: training one is the point
  c.total_steps = 1000
  c.batch_size = 8
  c.learning_rate = 1e-3  # a tiny VAE from random weights
  c.lr_schedule, c.warmup_steps = "cosine", 50
  c.weight_decay = 0.0
  c.checkpoint_every_steps, c.log_every_steps, c.sample_every_steps = 250, 50, 250
  if paper:
    vae_paper_scale(c, source)
  if full:
    c.vae.train_encoder = True
  return c


def prior_preservation(c: ml_collections.ConfigDict, class_prompt: str,
                       paper: bool) -> ml_collections.ConfigDict:
  c.prior.enabled = True
  c.prior.class_prompt = class_prompt
  c.prior.num_class_images = 200 if paper else 8
  return c


def check_train_config(config: Any, base: ml_collections.ConfigDict | None = None,
                       free_maps=FREE_MAPS) -> None:
  """Unknown keys (typos) are errors naming the key, where it is, and the known keys there;
  for a train config (no `base` given) also the values `check_values` checks."""
  values = base is None
  base = base_config() if base is None else base

  def walk(cfg, ref, prefix):
    check_known_keys(cfg.keys(), ref.keys(), f"config.{prefix[:-1]}" if prefix else "config")
    for key in cfg:
      name = f"{prefix}{key}"
      if name in free_maps:
        continue
      sub, sub_ref = cfg[key], ref[key]
      if isinstance(sub_ref, ml_collections.ConfigDict):
        if not isinstance(sub, (ml_collections.ConfigDict, dict)):
          raise MedjaxError(f"config: {name} must be a group of keys, got {sub!r}")
        walk(sub, sub_ref, name + ".")
  walk(config, base, "")
  if values:
    check_values(config)


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_values(config: Any) -> None:
  """Values whose failure would otherwise surface late or as another complaint (batch_size=0 as
  'not divisible by the devices', a bad data policy only after config.json is written)."""
  for key in ("batch_size", "grad_accum"):
    if not _positive_int(config[key]):
      raise MedjaxError(f"config.{key}={config[key]!r}: expected a positive integer")
  if not _positive_int(config.resolution) or config.resolution < 8:
    raise MedjaxError(f"config.resolution={config.resolution!r}: expected an integer >= 8")
  if config.data.on_bad_file not in ("error", "skip"):
    raise MedjaxError(f"config.data.on_bad_file={config.data.on_bad_file!r}: expected 'error' or "
                      "'skip'")
  check_fraction(config.data.max_bad_fraction)
  if config.get("protocol", "") not in ("", "paper_a", "paper_b"):
    raise MedjaxError(f"config.protocol={config.protocol!r}: expected '', 'paper_a' or 'paper_b'")
  _check_vae(config)
  if config.attention not in attention_lib.IMPLEMENTATIONS:
    raise MedjaxError(f"config.attention={config.attention!r}: expected one of "
                      f"{', '.join(attention_lib.IMPLEMENTATIONS)}")


def _check_vae(config: Any) -> None:
  v = config.vae
  if v.loss not in ("l1", "l2"):
    raise MedjaxError(f"config.vae.loss={v.loss!r}: expected 'l1' or 'l2'")
  if (isinstance(v.kl_weight, bool) or not isinstance(v.kl_weight, (int, float))
      or not v.kl_weight >= 0):
    raise MedjaxError(f"config.vae.kl_weight={v.kl_weight!r}: expected a number >= 0")
  for key in ("train_encoder", "train_decoder"):
    if not isinstance(v[key], bool):
      raise MedjaxError(f"config.vae.{key}={v[key]!r}: expected True or False")
  if config.objective == "vae" and not (v.train_encoder or v.train_decoder):
    raise MedjaxError("config.vae.train_encoder and config.vae.train_decoder are both False: "
                      "nothing to train")
  n = config.sample.num_reconstructions
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise MedjaxError(f"config.sample.num_reconstructions={n!r}: expected an integer >= 0")


def config_diff(a: dict, b: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
  """Keys whose values differ between two plain-dict configs (nested keys as a.b.c).

  A config key only one side has (one added since the other was saved) differs only if its
  value is not the default: a new key's default keeps the behaviour from before it existed.
  """
  defaults = json.loads(base_config().to_json()) if defaults is None else defaults
  out = []
  for key in sorted(set(a) | set(b)):
    name = f"{prefix}{key}"
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      sub = defaults.get(key) if name not in FREE_MAPS else None  # free maps: no defaults
      out += config_diff(va, vb, name + ".", sub if isinstance(sub, dict) else {})
    elif ((key in a) != (key in b) and key in defaults
          and _plain(va if key in a else vb) == _plain(defaults[key])):
      continue
    elif _plain(va) != _plain(vb):
      out.append(name)
  return out


def _plain(value):
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def from_saved(raw: dict) -> ml_collections.ConfigDict:
  """A run's config from its workdir's config.json (a dict): the defaults updated with it."""
  config = base_config()
  config.update_from_flattened_dict(_flatten(raw))
  return config


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and f"{prefix}{k}" not in FREE_MAPS:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(tuple(x) if isinstance(x, list) else x for x in v) \
          if isinstance(v, list) else v
  return out
