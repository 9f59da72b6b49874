"""`AutoencoderKL`: Stable Diffusion's VAE, NHWC, loading diffusers weights 1:1.

`encode` returns the diagonal Gaussian's (mean, logvar) and `decode` maps *unscaled* latents to
images; multiplying by `scaling_factor` is the caller's business, as in diffusers pipelines.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.errors import MedjaxError
from medjax.models import attention as attention_lib
from medjax.models import layers
from medjax.validation import check_config
from medjax.validation import int_at_least
from medjax.validation import item_or_list
from medjax.validation import list_of
from medjax.validation import optional
from medjax.validation import positive_number

Dtype = Any

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm


def latent_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """A draw from N(mean, exp(logvar)) with an explicit key (diffusers' `latent_dist.sample()`)."""
  noise = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * noise).astype(mean.dtype)


class _Block(nn.Module):
  """Fields shared by the VAE's blocks."""
  out_channels: int
  num_layers: int = 1
  groups: int = 32
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, i: int) -> nn.Module:
    cls = nn.remat(layers.ResnetBlock2D) if self.remat else layers.ResnetBlock2D
    return cls(self.out_channels, self.groups, _EPS, dtype=self.dtype,
               param_dtype=self.param_dtype, name=f"resnets_{i}")


class DownEncoderBlock2D(_Block):
  """Resnets, then a stride-2 conv padded bottom/right only (diffusers' padding=0)."""
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self.resnet(i)(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, padding=0, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsamplers_0")(x)
    return x


class UpDecoderBlock2D(_Block):
  """Resnets, then nearest 2x upsampling and a conv."""
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self.resnet(i)(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="upsamplers_0")(x)
    return x


class UNetMidBlock2D(_Block):
  """resnets_0, single-head self-attention over H*W (GroupNorm, residual), resnets_1."""
  add_attention: bool = True
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnet(0)(x)
    if self.add_attention:
      x = layers.Attention(1, self.out_channels, qkv_bias=True, norm_groups=self.groups,
                           norm_eps=_EPS, residual=True, upcast=True,
                           implementation=self.attention, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="attentions_0")(x)
    return self.resnet(1)(x)


class _Coder(nn.Module):
  """Fields shared by the encoder and the decoder."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int = 1
  groups: int = 32
  mid_attention: bool = True
  attention: str = "auto"
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def block(self, cls, out_channels: int, num_layers: int, name: str, **kwargs) -> nn.Module:
    return cls(out_channels, num_layers, self.groups, self.remat, dtype=self.dtype,
               param_dtype=self.param_dtype, name=name, **kwargs)

  def mid_block(self, channels: int) -> nn.Module:
    return self.block(UNetMidBlock2D, channels, 1, "mid_block", add_attention=self.mid_attention,
                      attention=self.attention)

  def conv(self, features: int, name: str) -> nn.Module:
    return layers.conv(features, name, dtype=self.dtype, param_dtype=self.param_dtype)

  def norm_act(self, x: jax.Array) -> jax.Array:
    norm = layers.group_norm(self.groups, _EPS, "conv_norm_out",
                             **layers.norm_kwargs(self.param_dtype))
    return nn.silu(norm(x))


class Encoder(_Coder):
  """conv_in, DownEncoderBlock2Ds, mid block, conv_out to 2 * latent_channels (mean, logvar)."""
  latent_channels: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = self.block_out_channels
    x = self.conv(channels[0], "conv_in")(x)
    for i, out in enumerate(channels):
      x = self.block(DownEncoderBlock2D, out, self.layers_per_block, f"down_blocks_{i}",
                     add_downsample=i < len(channels) - 1)(x)
    x = self.mid_block(channels[-1])(x)
    return self.conv(2 * self.latent_channels, "conv_out")(self.norm_act(x))


class Decoder(_Coder):
  """conv_in, mid block, UpDecoderBlock2Ds (layers_per_block + 1 resnets each), conv_out."""
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    channels = self.block_out_channels[::-1]
    x = self.conv(channels[0], "conv_in")(z)
    x = self.mid_block(channels[0])(x)
    for i, out in enumerate(channels):
      x = self.block(UpDecoderBlock2D, out, self.layers_per_block + 1, f"up_blocks_{i}",
                     add_upsample=i < len(channels) - 1)(x)
    return self.conv(self.out_channels, "conv_out")(self.norm_act(x))


_POSITIVE_INT = int_at_least(1)
# An int or (h, w), or null (informational in diffusers; medjax's default image size).
_SAMPLE_SIZE = optional(item_or_list(_POSITIVE_INT))

# diffusers 0.42 AutoencoderKL keys -> what medjax implements.
SUPPORTED_CONFIG = {
    "in_channels": _POSITIVE_INT,
    "out_channels": _POSITIVE_INT,
    "down_block_types": list_of(("DownEncoderBlock2D",)),
    "up_block_types": list_of(("UpDecoderBlock2D",)),
    "block_out_channels": list_of(_POSITIVE_INT),
    "layers_per_block": _POSITIVE_INT,
    "act_fn": ("silu", "swish"),
    "latent_channels": _POSITIVE_INT,
    "norm_num_groups": _POSITIVE_INT,
    "sample_size": _SAMPLE_SIZE,
    "scaling_factor": positive_number,
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "force_upcast": (False, True),
    "use_quant_conv": (False, True),
    "use_post_quant_conv": (False, True),
    "mid_block_add_attention": (False, True),
}


class AutoencoderKL(nn.Module):
  """Stable Diffusion's KL autoencoder: encoder, quant_conv, post_quant_conv, decoder."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  force_upcast: bool = True
  sample_size: Any = None  # informational, as in diffusers
  remat: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, source: str = "vae config",
                  dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  remat: bool = False, attention: str = "auto") -> "AutoencoderKL":
    """Builds the module from a diffusers `AutoencoderKL` config dict.

    `attention` picks the mid-block attention implementation (see `attention.attention`; SD's
    512-wide single head is beyond cuDNN, so 'auto' uses XLA there). Raises MedjaxError naming
    an unsupported key or value.
    """
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise MedjaxError(f"attention={attention!r} not in {attention_lib.IMPLEMENTATIONS}")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise MedjaxError(f"{source}: config key '_class_name' is {config['_class_name']!r}, "
                        "expected 'AutoencoderKL'")
    config = check_config(config, SUPPORTED_CONFIG, source)
    channels = tuple(config.get("block_out_channels", (64,)))
    for key, default in (("down_block_types", ("DownEncoderBlock2D",)),
                         ("up_block_types", ("UpDecoderBlock2D",))):
      if len(config.get(key, default)) != len(channels):
        raise MedjaxError(f"{source}: config key {key!r} needs one entry per block_out_channels "
                          f"({len(channels)})")
    groups = config.get("norm_num_groups", 32)
    if any(c % groups for c in channels):
      raise MedjaxError(f"{source}: config key 'norm_num_groups' = {groups} does not divide "
                        f"block_out_channels {list(channels)}")
    sample_size = config.get("sample_size", 32)
    return cls(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=channels,
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_num_groups=groups,
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        force_upcast=config.get("force_upcast", True),
        sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        remat=remat, attention=attention, dtype=dtype, param_dtype=param_dtype)

  @property
  def config(self) -> dict:
    """The diffusers config.json this module computes (what export writes back)."""
    n = len(self.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": self.layers_per_block,
        "act_fn": "silu",
        "latent_channels": self.latent_channels,
        "norm_num_groups": self.norm_num_groups,
        "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple)
                       else self.sample_size,
        "scaling_factor": self.scaling_factor,
        "force_upcast": self.force_upcast,
        "use_quant_conv": self.use_quant_conv,
        "use_post_quant_conv": self.use_post_quant_conv,
        "mid_block_add_attention": self.mid_block_add_attention,
    }

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
    """(images,) for `init`, at the smallest size the encoder accepts."""
    size = 2 ** (len(self.block_out_channels) - 1)
    return (jnp.zeros((batch, size, size, self.in_channels), jnp.float32),)

  def setup(self):
    common = dict(block_out_channels=self.block_out_channels,
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  mid_attention=self.mid_block_add_attention, attention=self.attention,
                  remat=self.remat,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = layers.conv(2 * self.latent_channels, "quant_conv", kernel_size=1, **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = layers.conv(self.latent_channels, "post_quant_conv", kernel_size=1,
                                         **kw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NHWC images in [-1, 1] -> (mean, logvar) of the latent Gaussian, fp32.

    logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution; fp32 because
    the latents feed the diffusion loss and the noise is added in fp32.
    """
    h = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """Unscaled NHWC latents (divide by `scaling_factor` first) -> images, in `dtype`."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction: encode, take the mean (or a sample with `rng`), decode."""
    mean, logvar = self.encode(x)
    if sample_posterior:
      if rng is None:
        raise ValueError("sample_posterior=True needs rng")
      z = latent_sample(mean, logvar, rng)
    else:
      z = mean
    return self.decode(z)
