"""`UNet2DConditionModel`: the Stable Diffusion 1.x / 2.x denoiser, NHWC, diffusers-compatible.

Submodules carry diffusers' names (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`),
so `medjax.convert.diffusers` maps a diffusers checkpoint onto it 1:1. `from_config` accepts a
diffusers `config.json`; a key medjax does not implement, or a non-default value of one, is a
`MedjaxError` naming the key rather than a model that silently computes something else.
"""
import dataclasses
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
from medjax.validation import is_bool
from medjax.validation import is_number
from medjax.validation import item_or_list
from medjax.validation import list_of
from medjax.validation import optional
from medjax.validation import positive_number

Dtype = Any

CROSS_ATTN_DOWN, DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"


@dataclasses.dataclass(frozen=True)
class CrossAttn:
  """The spatial-transformer settings of one block (hashable, so modules stay hashable)."""
  heads: int
  num_layers: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  implementation: str = "auto"


class _Block(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  out_channels: int
  num_layers: int
  attn: CrossAttn | None  # None: a resnet-only block (DownBlock2D / UpBlock2D)
  groups: int = 32
  eps: float = 1e-5
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def resnet(self, i: int) -> nn.Module:
    cls = nn.remat(layers.ResnetBlock2D) if self.remat else layers.ResnetBlock2D
    return cls(self.out_channels, self.groups, self.eps, dtype=self.dtype,
               param_dtype=self.param_dtype, name=f"resnets_{i}")

  def transformer(self, i: int) -> nn.Module:
    a = self.attn
    return layers.Transformer2DModel(
        a.heads, self.out_channels // a.heads, a.num_layers, self.groups,
        a.use_linear_projection, a.only_cross_attention, a.upcast, self.remat, a.implementation,
        dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{i}")


class DownBlock2D(_Block):
  """diffusers' DownBlock2D, or CrossAttnDownBlock2D when `attn` is set.

  Returns the output and every intermediate state, which the up path consumes as skips.
  """
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = self.resnet(i)(x, temb)
      if self.attn is not None:
        x = self.transformer(i)(x, context)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, 1, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class UNetMidBlock2DCrossAttn(_Block):
  """resnets_0, then (attentions_i, resnets_{i+1}) for each layer."""

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.resnet(0)(x, temb)
    for i in range(self.num_layers):
      x = self.transformer(i)(x, context)
      x = self.resnet(i + 1)(x, temb)
    return x


class UpBlock2D(_Block):
  """diffusers' UpBlock2D, or CrossAttnUpBlock2D when `attn` is set.

  Each resnet takes the running state concatenated with one skip (last first). The upsampler
  resizes to `upsample_size`, the next skip's size, so odd latent sizes round-trip as diffusers.
  """
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
      x = self.resnet(i)(x, temb)
      if self.attn is not None:
        x = self.transformer(i)(x, context)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="upsamplers_0")(x, upsample_size)
    return x


_POSITIVE_INT = int_at_least(1)
# An int or (h, w), or null (informational in diffusers; medjax's default image size).
_SAMPLE_SIZE = optional(item_or_list(_POSITIVE_INT))

# diffusers 0.42 UNet2DConditionModel keys -> what medjax implements (other values: defaults).
SUPPORTED_CONFIG = {
    "sample_size": _SAMPLE_SIZE,
    "in_channels": _POSITIVE_INT,
    "out_channels": _POSITIVE_INT,
    "center_input_sample": (False, True),
    "flip_sin_to_cos": (False, True),
    "freq_shift": is_number,
    "down_block_types": list_of((CROSS_ATTN_DOWN, DOWN)),
    "mid_block_type": (MID,),
    "up_block_types": list_of((CROSS_ATTN_UP, UP)),
    "only_cross_attention": item_or_list(is_bool),
    "block_out_channels": item_or_list(_POSITIVE_INT),
    "layers_per_block": item_or_list(_POSITIVE_INT),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "act_fn": ("silu", "swish"),
    "norm_num_groups": _POSITIVE_INT,
    "norm_eps": positive_number,
    "cross_attention_dim": item_or_list(_POSITIVE_INT),
    "transformer_layers_per_block": item_or_list(_POSITIVE_INT),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "attention_head_dim": item_or_list(_POSITIVE_INT),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "use_linear_projection": (False, True),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "upcast_attention": (False, True),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None,),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),
}


def _per_block(config: Mapping, key: str, default, n: int, source: str) -> tuple:
  """An int/bool-or-list config entry as one value per down block."""
  value = config.get(key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise MedjaxError(f"{source}: config key {key!r} has {len(value)} entries, "
                        f"expected one per down block ({n})")
    return tuple(value)
  return (value,) * n


def _freeze(value):
  return tuple(value) if isinstance(value, list) else value


class UNet2DConditionModel(nn.Module):
  """The conditional U-Net of Stable Diffusion, NHWC, numerically matching diffusers.

  Build it with `from_config(diffusers_config)`. Per-block fields are tuples over the down
  blocks (diffusers order); the up path uses them reversed, as diffusers does.
  """
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (DOWN,)
  up_block_types: tuple[str, ...] = (UP,) + (CROSS_ATTN_UP,) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # diffusers' `attention_head_dim`
  only_cross_attention: tuple[bool, ...] = (False,) * 4
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  upcast_attention: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  center_input_sample: bool = False
  sample_size: Any = None  # int or (h, w); informational, as in diffusers
  remat: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, source: str = "unet config",
                  dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  remat: bool = False, attention: str = "auto") -> "UNet2DConditionModel":
    """Builds the module from a diffusers `UNet2DConditionModel` config dict.

    Raises:
      MedjaxError naming the first unsupported key or value, or inconsistent list lengths.
    """
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
      raise MedjaxError(f"{source}: config key '_class_name' is {config['_class_name']!r}, "
                        "expected 'UNet2DConditionModel'")
    config = check_config(config, SUPPORTED_CONFIG, source)
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise MedjaxError(f"attention={attention!r} not in {attention_lib.IMPLEMENTATIONS}")
    down = tuple(config.get("down_block_types", cls.down_block_types))
    up = tuple(config.get("up_block_types", cls.up_block_types))
    n = len(down)
    channels = _per_block(config, "block_out_channels", (320, 640, 1280, 1280), n, source)
    if len(up) != n:
      raise MedjaxError(f"{source}: config key 'up_block_types' has {len(up)} entries, "
                        f"expected as many as down_block_types ({n})")
    cross_dims = set(_per_block(config, "cross_attention_dim", 1280, n, source))
    if len(cross_dims) != 1:
      raise MedjaxError(f"{source}: config key 'cross_attention_dim' = "
                        f"{config['cross_attention_dim']!r}: medjax needs one text width")
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in channels if c % groups]
    if bad:
      raise MedjaxError(f"{source}: config key 'norm_num_groups' = {groups} does not divide "
                        f"block_out_channels {list(channels)}")
    return cls(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=_per_block(config, "layers_per_block", 2, n, source),
        transformer_layers_per_block=_per_block(
            config, "transformer_layers_per_block", 1, n, source),
        num_attention_heads=_per_block(config, "attention_head_dim", 8, n, source),
        only_cross_attention=_per_block(config, "only_cross_attention", False, n, source),
        cross_attention_dim=cross_dims.pop(),
        use_linear_projection=config.get("use_linear_projection", False),
        upcast_attention=config.get("upcast_attention", False),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        norm_num_groups=groups,
        norm_eps=config.get("norm_eps", 1e-5),
        center_input_sample=config.get("center_input_sample", False),
        sample_size=_freeze(config.get("sample_size")),
        remat=remat, attention=attention, dtype=dtype, param_dtype=param_dtype)

  @property
  def config(self) -> dict:
    """The diffusers config.json this module computes (what export writes back)."""
    def compact(values):
      return values[0] if len(set(values)) == 1 else list(values)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple)
                       else self.sample_size,
        "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "center_input_sample": self.center_input_sample,
        "flip_sin_to_cos": self.flip_sin_to_cos,
        "freq_shift": self.freq_shift,
        "down_block_types": list(self.down_block_types),
        "mid_block_type": MID,
        "up_block_types": list(self.up_block_types),
        "only_cross_attention": compact(self.only_cross_attention),
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": compact(self.layers_per_block),
        "norm_num_groups": self.norm_num_groups,
        "norm_eps": self.norm_eps,
        "cross_attention_dim": self.cross_attention_dim,
        "transformer_layers_per_block": compact(self.transformer_layers_per_block),
        "attention_head_dim": compact(self.num_attention_heads),
        "use_linear_projection": self.use_linear_projection,
        "upcast_attention": self.upcast_attention,
        "act_fn": "silu",
    }

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sample, timesteps, encoder_hidden_states) for `init`: the smallest valid shapes.

    Params do not depend on the spatial size or text length, so init stays cheap.
    """
    size = 2 ** (len(self.block_out_channels) - 1)
    return (jnp.zeros((batch, size, size, self.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, 1, self.cross_attention_dim), jnp.float32))

  def _attn(self, i: int, cross: bool, heads: int | None = None) -> CrossAttn | None:
    if not cross:
      return None
    return CrossAttn(
        heads=heads or self.num_attention_heads[i],
        num_layers=self.transformer_layers_per_block[i],
        use_linear_projection=self.use_linear_projection,
        only_cross_attention=self.only_cross_attention[i],
        upcast=self.upcast_attention, implementation=self.attention)

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
               encoder_hidden_states: jax.Array) -> jax.Array:
    """Predicts the noise (or v) for NHWC latents `sample` [B, H, W, in_channels].

    Args:
      sample: noisy latents; any H, W (sizes that do not halve evenly are handled as diffusers).
      timesteps: [B] or a scalar, int or float.
      encoder_hidden_states: text embeddings [B, T, cross_attention_dim].

    Returns:
      [B, H, W, out_channels] in `dtype`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(groups=self.norm_num_groups, eps=self.norm_eps, remat=self.remat, **kw)
    n = len(self.block_out_channels)
    batch = sample.shape[0]
    context = encoder_hidden_states.astype(self.dtype)
    if self.center_input_sample:
      sample = 2 * sample - 1.0

    # time
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = layers.get_timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos,
                                          self.freq_shift)
    temb = layers.TimestepEmbedding(4 * self.block_out_channels[0], name="time_embedding",
                                    **kw)(t_emb.astype(self.dtype))

    # down
    x = layers.conv(self.block_out_channels[0], "conv_in", **kw)(sample.astype(self.dtype))
    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, res = DownBlock2D(self.block_out_channels[i], self.layers_per_block[i],
                           self._attn(i, kind == CROSS_ATTN_DOWN), add_downsample=i < n - 1,
                           name=f"down_blocks_{i}", **blk)(x, temb, context)
      skips += res

    # mid: the last block's heads and transformer depth, never only-cross-attention
    mid_attn = dataclasses.replace(self._attn(n - 1, True), only_cross_attention=False)
    x = UNetMidBlock2DCrossAttn(self.block_out_channels[-1], 1, mid_attn, name="mid_block",
                                **blk)(x, temb, context)

    # up: per-block settings reversed; each block eats layers_per_block + 1 skips
    for i, kind in enumerate(self.up_block_types):
      j = n - 1 - i  # the down block this up block mirrors
      num = self.layers_per_block[j] + 1
      res, skips = skips[-num:], skips[:-num]
      size = skips[-1].shape[1:3] if i < n - 1 else None
      x = UpBlock2D(self.block_out_channels[j], num, self._attn(j, kind == CROSS_ATTN_UP),
                    add_upsample=i < n - 1, name=f"up_blocks_{i}", **blk)(
                        x, res, temb, context, size)

    # out
    norm = layers.group_norm(self.norm_num_groups, self.norm_eps, "conv_norm_out",
                             **layers.norm_kwargs(self.param_dtype))
    x = nn.silu(norm(x))
    return layers.conv(self.out_channels, "conv_out", **kw)(x)
