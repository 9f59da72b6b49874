"""`StableDiffusion`: the three Flax models, their params, the tokenizer and scheduler config.

One object that training, sampling, export and evaluation share, so weights are loaded once.
Params are a plain pytree `{'unet': ..., 'vae': ..., 'text_encoder': ...}` kept in
`param_dtype` (fp32 by default); `dtype` is the compute dtype (fp32, or bf16 for speed).
"""
import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax import embedded as embedded_lib
from medjax import sampling
from medjax import schedulers
from medjax import tokenizer as tokenizer_lib
from medjax import validation
from medjax.convert import diffusers as diffusers_io
from medjax.convert import embeddings as embeddings_io
from medjax.convert import single_file
from medjax.convert import single_file_meta
from medjax.convert import sources
from medjax.errors import MedjaxError
from medjax.models import AutoencoderKL
from medjax.models import CLIPTextModel
from medjax.models import UNet2DConditionModel
from medjax.models import clip

MODEL_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
                 "text_encoder": CLIPTextModel}


def build_models(configs: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                 attention="auto", sources: dict | None = None) -> dict[str, nn.Module]:
  """Builds the Flax modules from their diffusers/transformers config dicts."""
  sources = sources or {}
  return {name: cls.from_config(configs[name], source=sources.get(name, f"{name} config"),
                                dtype=dtype, param_dtype=param_dtype, remat=remat,
                                attention=attention)
          for name, cls in MODEL_CLASSES.items()}


def boxed_param_shapes(module: nn.Module):
  """Param shapes with their logical-axis boxes (no FLOPs, no memory)."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"]


def param_shapes(module: nn.Module):
  """Unboxed param shapes (ShapeDtypeStructs): what a weights file must provide."""
  return nn.unbox(boxed_param_shapes(module))


def init_params(module: nn.Module, seed: int, dtype=np.float32):
  """Random params drawn from `seed`, without running or compiling the forward pass.

  `module.init` would compile the whole model (a minute for a tiny U-Net on 2 CPU cores); here
  each leaf is drawn by its kind instead, with Flax's default distributions: kernels LeCun
  normal (variance 1/fan_in), embeddings N(0, 0.02^2), biases 0, norm scales 1.
  """
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(param_shapes(module))
  params = {}
  for path, leaf in sorted(flat.items()):
    kind, shape = path[-1], leaf.shape
    if kind == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif kind == "embedding":
      value = rng.standard_normal(shape) * 0.02
    elif kind == "scale":
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    params[path] = value.astype(dtype)
  return jax.device_put(flax.traverse_util.unflatten_dict(params))  # see _assemble


@dataclasses.dataclass(eq=False)
class StableDiffusion:
  """A Stable Diffusion model: modules, params and the pieces around them.

  Attributes:
    unet, vae, text_encoder: Flax modules (stateless).
    params: {'unet', 'vae', 'text_encoder'} -> param pytrees.
    tokenizer: a `transformers.CLIPTokenizer`.
    tokenizer_dir: the folder the tokenizer was read from (export copies it).
    configs: component -> its config.json dict (export writes them back).
    scheduler_config: the pipeline's scheduler/scheduler_config.json.
    name: where the model came from (a path, or 'embedded-tiny-seed<N>').
  """
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  params: dict
  tokenizer: Any
  tokenizer_dir: Path
  configs: dict
  scheduler_config: dict
  name: str

  # -- construction --------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path, dtype=jnp.float32, *, param_dtype=jnp.float32,
                      variant: str | None = None, remat: bool = False,
                      attention: str = "auto") -> "StableDiffusion":
    """Loads a diffusers-format Stable Diffusion directory (SD 1.x / 2.x layouts).

    Args:
      path: directory with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
      dtype: compute dtype (jnp.float32 or jnp.bfloat16).
      param_dtype: dtype the params are kept in.
      variant: weight file variant, e.g. 'fp16' for `diffusion_pytorch_model.fp16.safetensors`.
      remat: rematerialise blocks in the backward pass (less memory for training).
      attention: 'auto' | 'xla' | 'blocked' | 'cudnn' | 'pallas_tpu' (see medjax.models.attention).
    """
    path = Path(path)
    diffusers_io.read_pipeline_index(path)
    configs = {name: diffusers_io.read_component_config(path / name / "config.json", name)
               for name in MODEL_CLASSES}
    read = lambda name, shapes: diffusers_io.read_component_params(
        path / name, name, shapes, variant=variant, dtype=np.dtype(param_dtype))
    scheduler_config = diffusers_io.read_scheduler_config(
        path / "scheduler" / "scheduler_config.json")
    return cls._assemble(configs, read, path / "tokenizer", scheduler_config, str(path),
                         sources={**{n: str(path / n / "config.json") for n in MODEL_CLASSES},
                                  "scheduler": str(path / "scheduler" / "scheduler_config.json")},
                         dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)

  @classmethod
  def from_single_file(cls, path, dtype=jnp.float32, *, tokenizer=None,
                       configs: dict | None = None, scheduler_config: dict | None = None,
                       allow_pickle: bool = False, ema: bool = False,
                       param_dtype=jnp.float32, remat: bool = False,
                       attention: str = "auto") -> "StableDiffusion":
    """Loads an original single-file SD checkpoint (the AUTOMATIC1111 / CompVis layout).

    A file medjax wrote (`save_single_file`) carries its configs, scheduler and tokenizer and
    loads back as exactly the exported model; for others see `convert.single_file_meta`.

    Args:
      path: a `.safetensors` file (`.ckpt`/`.pt` only with `allow_pickle=True`, read with
        `torch.load(weights_only=True)`).
      tokenizer: a CLIP tokenizer folder. By default the file's own (medjax exports), else the
        real CLIP vocabulary built from open_clip's `bpe_simple_vocab_16e6.txt.gz` if installed.
      configs: per-component config overrides for what the weights do not determine
        (e.g. {'unet': {'attention_head_dim': 8}}); see `convert.single_file`.
      scheduler_config: defaults to the file's own, else SD's PNDM config (v-prediction when an
        AUTOMATIC1111 `<file>.yaml` says `parameterization: "v"`, as for SD2 768-v).
      ema: take the EMA weights of the U-Net when the checkpoint has them.
    """
    extras = single_file_meta.read(path)
    overrides = {n: {**(extras.configs or {}).get(n, {}), **(configs or {}).get(n, {})}
                 for n in MODEL_CLASSES}
    state_dicts, configs = single_file.load_single_file(
        path, allow_pickle=allow_pickle, configs=overrides, ema=ema)
    tokenizer_dir = (Path(tokenizer) if tokenizer else extras.tokenizer_dir
                     or tokenizer_lib.default_clip_tokenizer_dir(**configs.pop("tokenizer", {})))
    if scheduler_config is None:
      scheduler_config = extras.scheduler_config or dict(embedded_lib.SD_SCHEDULER_CONFIG)
      if extras.prediction_type:
        scheduler_config["prediction_type"] = extras.prediction_type
    read = lambda name, shapes: diffusers_io.state_dict_to_params(
        state_dicts[name], shapes, source=str(path), dtype=np.dtype(param_dtype))
    return cls._assemble(configs, read, tokenizer_dir, scheduler_config, str(path),
                         dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)

  @classmethod
  def _assemble(cls, configs, read_params, tokenizer_dir, scheduler_config, name, *,
                sources=None, **model_kwargs) -> "StableDiffusion":
    """Builds the modules from `configs` and fills them with `read_params(name, shapes)`."""
    _check_scheduler_config(scheduler_config, (sources or {}).get("scheduler",
                                                                  "scheduler_config"))
    models = build_models(configs, sources=sources, **model_kwargs)
    # One device_put per tree: jnp.asarray per leaf compiles a staging program for every
    # distinct shape (jax 0.10: 414 compiles to load a mid-size pipeline).
    params = {n: jax.device_put(read_params(n, param_shapes(m))) for n, m in models.items()}
    tok = tokenizer_lib.expanding_if_multi_vector(tokenizer_lib.load_tokenizer(tokenizer_dir))
    _check_vocab(tok, configs["text_encoder"], tokenizer_dir)
    return cls(**models, params=params, tokenizer=tok, tokenizer_dir=Path(tokenizer_dir),
               configs={n: configs[n] for n in MODEL_CLASSES}, scheduler_config=scheduler_config,
               name=name)

  @classmethod
  def embedded(cls, seed: int = 0, dtype=jnp.float32, *, pretrained: bool = True,
               param_dtype=jnp.float32, remat: bool = False, attention: str = "auto",
               tokenizer_dir=None) -> "StableDiffusion":
    """The embedded default (no download): the tiny SD medjax trained on its phantoms.

    pretrained=False: the same model with seeded random weights (`seed`; the same seed gives
    the same weights). See `medjax.embedded`.
    """
    kw = {"dtype": dtype, "param_dtype": param_dtype, "remat": remat, "attention": attention}
    if pretrained:
      if tokenizer_dir is not None:
        raise MedjaxError("StableDiffusion.embedded: tokenizer_dir is for pretrained=False (the "
                          "shipped weights carry their tokenizer)")
      if not embedded_lib.WEIGHTS.is_file():
        raise MedjaxError(f"{embedded_lib.WEIGHTS}: the embedded model's weights are missing "
                          "(rebuild them: configs/embedded_pretrain.py), or use "
                          "pretrained=False (config.model.embedded_random=True)")
      sd = cls.from_single_file(embedded_lib.WEIGHTS, **kw)
      return dataclasses.replace(sd, name=embedded_lib.PRETRAINED_NAME)
    tiny = embedded_lib.tiny_parts(seed, tokenizer_dir)
    models = build_models(tiny.configs, **kw)
    params = {name: init_params(m, tiny.param_seeds[name], dtype=param_dtype)
              for name, m in models.items()}
    return cls(**models, params=params, tokenizer=tiny.tokenizer,
               tokenizer_dir=tiny.tokenizer_dir, configs=tiny.configs,
               scheduler_config=tiny.scheduler_config, name=tiny.name)

  @classmethod
  def load(cls, pretrained: str | None, *, allow_pickle: bool = False,
           variant: str | None = None, **kwargs) -> "StableDiffusion":
    """The model a command's `pretrained` names; '' = the embedded tiny model (keywords
    `pretrained=False, seed=N` give its random weights instead).

    Otherwise a diffusers directory (PyTorch or old Flax weights), a single-file checkpoint
    (`.ckpt` only with `allow_pickle`), or a Hugging Face id from the local cache; see
    `medjax.convert.sources`. `variant` applies to diffusers directories, the other keywords
    to every loader (dtype, param_dtype, remat, attention).
    """
    if not pretrained:
      return cls.embedded(**kwargs)
    source = sources.resolve(pretrained)
    if source.kind == sources.SINGLE_FILE:
      sd = cls.from_single_file(source.path, allow_pickle=allow_pickle, **kwargs)
    else:
      sd = cls.from_pretrained(source.path, variant=variant or None, **kwargs)
    return sd if sd.name == source.name else dataclasses.replace(sd, name=source.name)

  def save_pretrained(self, out_dir, dtype=np.float32) -> None:
    """Writes a diffusers directory that `diffusers.StableDiffusionPipeline` loads."""
    diffusers_io.write_pipeline(
        out_dir, configs=self.configs, params=jax.device_get(self.params),
        scheduler_config=self.scheduler_config, tokenizer_dir=self.tokenizer_dir, dtype=dtype)

  def save_single_file(self, path, dtype=np.float32, metadata=None) -> None:
    """Writes one `.safetensors` checkpoint in the original SD layout, which AUTOMATIC1111,
    ComfyUI and diffusers' `from_single_file` load; medjax reloads it exactly (its configs,
    scheduler and tokenizer ride in the metadata: `convert.single_file_meta`). `metadata`: more
    str -> str entries."""
    params = jax.device_get(self.params)
    state_dicts = {n: diffusers_io.params_to_state_dict(params[n], dtype=dtype)
                   for n in MODEL_CLASSES}
    single_file.save_single_file(path, state_dicts, self.configs, metadata={
        **single_file_meta.encode(self.configs, self.scheduler_config, self.tokenizer_dir),
        **(metadata or {})})

  # -- properties ----------------------------------------------------------------------------

  @property
  def vae_scale_factor(self) -> int:
    """Pixels per latent cell (8 for every SD VAE)."""
    return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

  @property
  def scaling_factor(self) -> float:
    return float(self.configs["vae"].get("scaling_factor", 0.18215))

  @property
  def latent_channels(self) -> int:
    return int(self.configs["vae"].get("latent_channels", 4))

  def logical_axes(self) -> dict:
    """Logical axis names of every param (PartitionSpecs of names), for mesh sharding rules."""
    return {name: nn.get_partition_spec(boxed_param_shapes(getattr(self, name)))
            for name in MODEL_CLASSES}

  # -- the public calls ----------------------------------------------------------------------

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> int32 [B, 77] token ids, padded and truncated as diffusers does."""
    if isinstance(prompts, str):
      prompts = [prompts]
    return tokenizer_lib.tokenize(self.tokenizer, list(prompts))

  def encode_prompt(self, prompts: Sequence[str] | np.ndarray) -> jax.Array:
    """Prompts (or token ids) -> text embeddings [B, 77, D] (the text encoder's last hidden
    state)."""
    ids = prompts if isinstance(prompts, (np.ndarray, jax.Array)) else self.tokenize(prompts)
    return self._text_fn(self.params["text_encoder"], jnp.asarray(ids, jnp.int32))

  def predict_noise(self, latents, timesteps, encoder_hidden_states) -> jax.Array:
    """The U-Net: noisy latents NHWC [B, h, w, C], timesteps int [B], embeddings -> prediction."""
    latents = jnp.asarray(latents)
    channels = int(self.configs["unet"].get("in_channels", 4))
    if latents.ndim != 4 or latents.shape[-1] != channels:
      raise MedjaxError(f"predict_noise: latents must be NHWC [B, h, w, {channels}], "
                        f"got shape {tuple(latents.shape)}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (latents.shape[0],))
    return self._unet_fn(self.params["unet"], latents, timesteps,
                         jnp.asarray(encoder_hidden_states))

  def encode_images(self, images, key: jax.Array | None = None) -> jax.Array:
    """Images NHWC in [-1, 1] -> scaled latents: the posterior mean (or a sample given `key`)."""
    images = jnp.asarray(images)
    f = self.vae_scale_factor
    channels = int(self.configs["vae"].get("in_channels", 3))
    if images.ndim != 4 or images.shape[-1] != channels:
      raise MedjaxError(f"encode_images: images must be NHWC [B, H, W, {channels}] "
                        f"in [-1, 1], got shape {tuple(images.shape)}")
    if images.shape[1] % f or images.shape[2] % f:
      raise MedjaxError(f"encode_images: height and width must be multiples of {f}, "
                        f"got {images.shape[1]}x{images.shape[2]}")
    return self._encode_fn(self.params["vae"], images, key)

  def decode_latents(self, latents) -> jax.Array:
    """Scaled latents -> images NHWC in [-1, 1] (not clipped, as the VAE outputs them)."""
    latents = jnp.asarray(latents)
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise MedjaxError(f"decode_latents: latents must be NHWC [B, h, w, {self.latent_channels}], "
                        f"got shape {tuple(latents.shape)}")
    return self._decode_fn(self.params["vae"], latents)

  def generate(self, prompts=None, negative_prompts=None, num_inference_steps: int = 50,
               guidance_scale: float = 7.5, scheduler: str | None = "ddim",
               height: int | None = None, width: int | None = None, seed=0, latents=None,
               **kwargs) -> np.ndarray:
    """Images NHWC in [0, 1] from prompts, one compiled graph; see `medjax.sampling.generate`."""
    return sampling.generate(self, prompts, negative_prompts,
                             num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, scheduler=scheduler, height=height,
                             width=width, seed=seed, latents=latents, **kwargs)

  def load_embeddings(self, paths_or_dict, tokens: str | Sequence[str | None] | None = None,
                      allow_pickle: bool = False) -> "StableDiffusion":
    """A new model with textual-inversion tokens added (as diffusers' `load_textual_inversion`).

    Reads embedding files (see `medjax.convert.embeddings`) or takes {token: array}, and returns
    `add_tokens(...)`; `self` stays valid.

    Args:
      paths_or_dict: a path, a list of paths, or {token: [n, dim]}.
      tokens: token names, one per path (None keeps the file's own name).
      allow_pickle: read `.pt`/`.bin` files (torch.load with weights_only=True).
    """
    if isinstance(paths_or_dict, Mapping):
      if tokens is not None:
        raise MedjaxError("load_embeddings: `tokens` names files' embeddings; a dict already "
                          "names its tokens")
      return self.add_tokens(paths_or_dict)
    paths = ([paths_or_dict] if isinstance(paths_or_dict, (str, os.PathLike))
             else list(paths_or_dict))
    names = [tokens] if tokens is None or isinstance(tokens, str) else list(tokens)
    if len(names) == 1 and len(paths) > 1 and names[0] is None:
      names = names * len(paths)
    if len(names) != len(paths):
      raise MedjaxError(f"load_embeddings: {len(paths)} files but {len(names)} tokens")
    merged, sources = {}, {}
    for path, name in zip(paths, names, strict=True):
      found = embeddings_io.read_embeddings(path, token=name, allow_pickle=allow_pickle)
      for token, emb in found.items():
        if token in merged:
          raise MedjaxError(f"{path}: token {token!r} is also in {sources[token]}")
        merged[token], sources[token] = emb, str(path)
    return self.add_tokens(merged, sources=sources)

  def add_tokens(self, embeddings: Mapping[str, Any], *,
                 sources: Mapping[str, Any] | None = None) -> "StableDiffusion":
    """A new model with `embeddings` ({token: [n, dim]}) added; `self` stays valid.

    Tokens are added as diffusers' `load_textual_inversion` adds them (`tok`, `tok_1`, ...), the
    token-embedding table grows if needed, and the tokenizer is saved to a new folder so that
    `save_pretrained` exports the added tokens too. `sources` ({token: file}) names the files
    in error messages.
    """
    sources = sources or {}
    where = lambda t: f"{sources[t]}: embedding {t!r}" if t in sources else f"embedding {t!r}"
    if not embeddings:
      raise MedjaxError("add_tokens: no embeddings given")
    vocab = tokenizer_lib.base_tokenizer(self.tokenizer).get_vocab()
    dim = int(clip.token_embedding_table(self.params["text_encoder"]).shape[-1])
    names, rows = [], []
    for token, emb in embeddings.items():
      embeddings_io.check_token(token, "add_tokens")
      emb = embeddings_io.as_vectors(emb, where(token))
      if emb.shape[1] != dim:
        raise MedjaxError(f"{where(token)} has width {emb.shape[1]}, but the text encoder's "
                          f"token embeddings are {dim} wide (trained for another base model?)")
      if not np.all(np.isfinite(np.asarray(emb, np.float32))):
        raise MedjaxError(f"{where(token)} holds NaN or infinite values")
      expanded = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
      for name in expanded + [f"{token}_1"]:
        if name in vocab or name in names:
          raise MedjaxError(f"token {name!r} is already in the tokenizer vocabulary; choose "
                            "another token name")
      names += expanded
      rows += list(emb)
    tok, ids, tokenizer_dir = tokenizer_lib.add_tokens(self.tokenizer, names)
    text_params = clip.set_token_embeddings(self.params["text_encoder"], ids, rows)
    new_vocab = int(clip.token_embedding_table(text_params).shape[0])
    configs = dict(self.configs)
    configs["text_encoder"] = {**self.configs["text_encoder"], "vocab_size": new_vocab}
    text_encoder = self.text_encoder.clone(config={**self.text_encoder.config,
                                                   "vocab_size": new_vocab})
    return dataclasses.replace(self, text_encoder=text_encoder,
                               params={**self.params, "text_encoder": text_params},
                               tokenizer=tok, tokenizer_dir=tokenizer_dir, configs=configs)

  # -- jitted pure functions (one compile per input shape). The U-Net's and VAE's are shared by
  # every instance of one architecture, so a reload or a second copy compiles nothing new (the
  # text encoder's module holds its config dict, which cannot key a cache) ---------------------

  @functools.cached_property
  def _text_fn(self):
    return jax.jit(lambda p, ids: self.text_encoder.apply({"params": p}, ids)[0])

  @property
  def _unet_fn(self):
    return _unet_program(self.unet)

  @property
  def _encode_fn(self):
    return _encode_program(self.vae, self.scaling_factor)

  @property
  def _decode_fn(self):
    return _decode_program(self.vae, self.scaling_factor)


# Keyed by the (hashable, compared by config) Flax modules, as `sampling` keys its programs.
@functools.lru_cache(maxsize=16)
def _unet_program(unet):
  return jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))


@functools.lru_cache(maxsize=16)
def _encode_program(vae, scale: float):
  def encode(p, x, key):
    mean, logvar = vae.apply({"params": p}, x, method="encode")
    if key is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return mean * scale
  return jax.jit(encode)


@functools.lru_cache(maxsize=16)
def _decode_program(vae, scale: float):
  return jax.jit(lambda p, z: vae.apply({"params": p}, z / scale, method="decode"))


def _check_vocab(tok, text_config: dict, path: Path) -> None:
  """The tokenizer fits the text encoder: its ids index the token table, its padded length
  the position table (checked at load, not at the first prompt)."""
  vocab = int(text_config.get("vocab_size", 0))
  if len(tok) > vocab:
    raise MedjaxError(f"{path}: tokenizer has {len(tok)} tokens but text_encoder/config.json "
                      f"vocab_size is {vocab}")
  length, positions = tok.model_max_length, int(text_config.get("max_position_embeddings", 77))
  if not validation.is_int(length) or not 1 <= length <= positions:
    raise MedjaxError(f"{path}: tokenizer model_max_length = {length!r}; expected an integer "
                      f"in [1, {positions}] (text_encoder max_position_embeddings)")


def _check_scheduler_config(config: dict, source: str) -> None:
  """Every key and value of the scheduler config, at load rather than at the first sample.

  Checked as its own class when medjax has it, else as DDPM (a pipeline whose class medjax
  lacks still samples with a scheduler named explicitly).
  """
  name = schedulers.CLASS_NAMES.get(config.get("_class_name"), "ddpm")
  try:
    schedulers.resolve_config(name, config)
  except MedjaxError as e:
    raise MedjaxError(f"{source}: {e}") from None
