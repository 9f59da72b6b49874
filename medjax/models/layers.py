"""Building blocks shared by the U-Net, the VAE and the text encoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that configs can
shard them over a mesh with rules such as `('embed', 'fsdp')`. Compute runs in `dtype`
(e.g. bf16) while params stay in `param_dtype` (fp32). Tensors are NHWC / [batch, tokens, dim].
Names of submodules follow diffusers/transformers so `medjax.convert.diffusers` maps them 1:1.
"""
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medjax.models.attention import attention

Dtype = Any

# Logical axis names. Configs map them to mesh axes (see medjax/sharding.py).
EMBED = "embed"          # model width (hidden size, channels)
MLP = "mlp"              # expanded width (feed-forward inner, projected outputs)
HEADS = "heads"          # attention q/k/v/out width
VOCAB = "vocab"
NORM = "norm"
CONV_H, CONV_W = "conv_height", "conv_width"
CONV_IN, CONV_OUT = "conv_in", "conv_out"


def dense(features: int, name: str, axes: tuple[str, str] = (EMBED, MLP), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
  """A Dense layer whose kernel is annotated (in_axis, out_axis) and bias (out_axis,)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


@functools.cache
def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def _im2col_applies(lhs: jax.Array, rhs: jax.Array, strides, padding, lhs_dilation,
                    rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """Whether `conv_general_dilated` takes the matmul path: on CPU, for the plain NHWC/HWIO conv,
  when it is 1x1 or its kernel outweighs its output pixels (2 x pixels <= out channels)."""
  if not _on_cpu() or feature_group_count != 1 or lhs.ndim != 4 or isinstance(padding, str):
    return False
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  if dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO):
    return False
  if any(p < 0 for pair in padding for p in pair):
    return False
  kh, kw, _, cout = rhs.shape
  if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and not any(map(any, padding)):
    return True
  (pt, pb), (pl, pr) = padding
  out_h = (lhs.shape[1] + pt + pb - kh) // strides[0] + 1
  out_w = (lhs.shape[2] + pl + pr - kw) // strides[1] + 1
  return 2 * lhs.shape[0] * out_h * out_w <= cout


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated`, as one matmul over im2col patches where XLA:CPU's conv is slow.

  XLA:CPU's conv backward copies the kernel reversed and transposed for the input gradient and
  forms the kernel gradient as a conv with the batch (1) as its inner dimension; where the kernel
  outweighs the activations (the U-Net's 8x8 and 4x4 levels, 1x1 convs) these dominate the step
  (single core, 3x3 512->256 at 4x4, forward + gradient: 2.7 -> 1.3 ms; SD1.5 1280->1280 at 8x8:
  163 -> 67 ms). A matmul over the k*k shifted copies of the input needs no kernel copy, and its
  gradients are two matmuls and the sum of the shifted copies. Large images keep XLA's conv: there
  the patches (k*k times the input) would cost more than the kernel copies. Other backends keep
  their own conv.
  """
  if not _im2col_applies(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision, **kwargs)
  batch, height, width, cin = lhs.shape
  kh, kw, _, cout = rhs.shape
  (pt, pb), (pl, pr) = padding
  sh, sw = window_strides
  out_h, out_w = (height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  # Patch features in (kh, kw, cin) order, the HWIO kernel's row order.
  patches = jnp.concatenate(
      [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
       for i in range(kh) for j in range(kw)], axis=-1) if (kh, kw) != (1, 1) else x
  out = lax.dot_general(patches.reshape(-1, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                        (((1,), (0,)), ((), ())), precision=precision)
  return out.reshape(batch, out_h, out_w, cout)


def conv(features: int, name: str, kernel_size: int = 3, stride: int = 1,
         padding: int | Sequence[tuple[int, int]] = None, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
  """A 2D conv (NHWC, HWIO kernel) with PyTorch's symmetric padding by default (k // 2)."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
      dtype=dtype, param_dtype=param_dtype, name=name, conv_general_dilated=conv_general_dilated,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (CONV_H, CONV_W, CONV_IN, CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)))


class GroupNorm(nn.Module):
  """GroupNorm over the channels (last axis) of [B, ..., C]; params `scale` and `bias` [C], as
  flax's nn.GroupNorm names them.

  Statistics in fp32 (as PyTorch under autocast), two-pass (as PyTorch: E[x^2]-E[x]^2 loses
  digits when |mean| >> std). The sums run per channel over the spatial axes, then per group:
  XLA:CPU reduces flax's [B, H, W, G, C/G] view over non-minor axes several times slower
  (mid U-Net 64 channels at 32x32, GroupNorm+SiLU forward, one core: 0.41 -> 0.14 ms).
  """
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, channels = x.shape[0], x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {self.num_groups} groups do not divide {channels} channels")
    init = lambda fn: nn.with_logical_partitioning(fn, (NORM,))
    scale = self.param("scale", init(nn.initializers.ones_init()), (channels,), self.param_dtype)
    bias = self.param("bias", init(nn.initializers.zeros_init()), (channels,), self.param_dtype)
    axes = tuple(range(1, x.ndim - 1))
    per_group = channels // self.num_groups
    count = math.prod(x.shape[1:-1]) * per_group

    def group_mean(channel_sums: jax.Array) -> jax.Array:
      """[B, C] per-channel sums -> [B, 1.., C]: each channel's group mean."""
      sums = channel_sums.reshape(batch, self.num_groups, per_group).sum(-1, keepdims=True)
      sums = jnp.broadcast_to(sums, (batch, self.num_groups, per_group))
      return sums.reshape((batch,) + (1,) * len(axes) + (channels,)) / count

    x = x.astype(jnp.float32)
    centred = x - group_mean(jnp.sum(x, axes))
    var = group_mean(jnp.sum(centred * centred, axes))
    y = centred * (lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32))
    return (y + bias.astype(jnp.float32)).astype(self.dtype)


def group_norm(num_groups: int, epsilon: float, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> GroupNorm:
  """GroupNorm over channels (last axis), statistics in fp32 as PyTorch does under autocast."""
  return GroupNorm(num_groups, epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def _mean_last(v: jax.Array) -> jax.Array:
  """Mean over the last axis, as a matmul with a 1/n vector: [..., n] -> [..., 1]."""
  weights = jnp.full((v.shape[-1], 1), 1.0 / v.shape[-1], v.dtype)
  return jnp.matmul(v, weights, precision=lax.Precision.HIGHEST)


def _sum_leading(v: jax.Array) -> jax.Array:
  """Sum over every axis but the last, as a matmul with a ones vector: [..., n] -> [n]."""
  rows = v.reshape(-1, v.shape[-1])
  return jnp.matmul(jnp.ones((1, rows.shape[0]), v.dtype), rows, precision=lax.Precision.HIGHEST)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  return _layer_norm_cpu_fwd(x, scale, bias, epsilon)[0]


def _layer_norm(x, scale, bias, epsilon, mean_last):
  """Two-pass LayerNorm in fp32 with `mean_last` ([..., n] -> [..., 1]): (y, mean, rstd)."""
  x32 = x.astype(jnp.float32)
  mean = mean_last(x32)
  centred = x32 - mean
  rstd = lax.rsqrt(mean_last(centred * centred) + epsilon)
  y = centred * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y, mean, rstd


def _layer_norm_cpu_fwd(x, scale, bias, epsilon):
  y, mean, rstd = _layer_norm(x, scale, bias, epsilon, _mean_last)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_cpu_bwd(epsilon, residuals, g):
  del epsilon
  x, mean, rstd, scale, bias = residuals
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gy = g * scale.astype(jnp.float32)
  dx = rstd * (gy - _mean_last(gy) - xhat * _mean_last(gy * xhat))
  return (dx.astype(x.dtype), _sum_leading(g * xhat).astype(scale.dtype),
          _sum_leading(g).astype(bias.dtype))


_layer_norm_cpu.defvjp(_layer_norm_cpu_fwd, _layer_norm_cpu_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in fp32, two-pass; params `scale` and `bias` [C]
  as flax's nn.LayerNorm names them.

  On CPU the row means and the parameter sums are matmuls with a constant vector and the gradient
  is written out: the autodiff of flax's LayerNorm gives XLA:CPU fused reductions over broadcast
  operands that ran ~10x slower than PyTorch (one core, [1, 1024, 64] tokens, gradient: 0.97 ->
  0.10 ms, PyTorch 0.13; SD1.5 [1, 4096, 320]: 15.7 -> 2.5 ms, PyTorch 1.4). Elsewhere plain
  reductions, as flax computes them.
  """
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = lambda fn: nn.with_logical_partitioning(fn, (NORM,))
    features = (x.shape[-1],)
    scale = self.param("scale", init(nn.initializers.ones_init()), features, self.param_dtype)
    bias = self.param("bias", init(nn.initializers.zeros_init()), features, self.param_dtype)
    if _on_cpu():
      return _layer_norm_cpu(x, scale, bias, self.epsilon).astype(self.dtype)
    mean_last = lambda v: jnp.mean(v, -1, keepdims=True)
    return _layer_norm(x, scale, bias, self.epsilon, mean_last)[0].astype(self.dtype)


def layer_norm(epsilon: float, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> LayerNorm:
  return LayerNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def embed(num_embeddings: int, features: int, name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Embed:
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (VOCAB, EMBED)))


# ---------------------------------------------------------------------------------------------
# Blocks shared by the U-Net and the VAE (diffusers' resnet.py, attention.py, embeddings.py).


def norm_kwargs(param_dtype: Dtype) -> dict:
  """Norms in the blocks below output fp32, as under torch autocast.

  The following conv/dense casts to the compute dtype, and XLA fuses normalise, activation
  and cast into one pass, so this costs no extra memory traffic while keeping bf16 closer.
  """
  return dict(dtype=jnp.float32, param_dtype=param_dtype)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000) -> jax.Array:
  """Sinusoidal embedding of [N] (possibly fractional) timesteps -> [N, dim], fp32 as diffusers."""
  half_dim = embedding_dim // 2
  exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half_dim - downscale_freq_shift))
  emb = scale * (timesteps.astype(jnp.float32)[:, None] * freqs[None, :])
  sin, cos = jnp.sin(emb), jnp.cos(emb)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if embedding_dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """The MLP applied to the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.features, "linear_1", axes=(EMBED, MLP), **kw)(x)
    return dense(self.features, "linear_2", axes=(MLP, EMBED), **kw)(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """Pre-norm residual block; `temb` (if given) is projected and added after conv1.

  A 1x1 `conv_shortcut` exists exactly when the channel count changes, as in diffusers.
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    nkw = norm_kwargs(self.param_dtype)
    h = nn.silu(group_norm(self.groups, self.eps, "norm1", **nkw)(x))
    h = conv(self.out_channels, "conv1", **kw)(h)
    if temb is not None:
      temb = dense(self.out_channels, "time_emb_proj", axes=(EMBED, MLP), **kw)(nn.silu(temb))
      h = h + temb[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, "norm2", **nkw)(h))
    h = conv(self.out_channels, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, "conv_shortcut", kernel_size=1, **kw)(x)
    return x + h


class Attention(nn.Module):
  """diffusers `Attention`: to_q / to_k / to_v / to_out_0 over [B, T, C] tokens.

  With `context` it is cross-attention (keys and values from the text). The VAE variant takes an
  NHWC feature map, normalises it with `group_norm` first and adds the input back
  (`residual_connection`), as diffusers' `_from_deprecated_attn_block` layers do.
  """
  heads: int
  head_dim: int
  qkv_bias: bool = False
  norm_groups: int | None = None  # VAE: GroupNorm before the projections
  norm_eps: float = 1e-6
  residual: bool = False
  upcast: bool = False
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual, shape = x, x.shape
    if self.norm_groups is not None:
      x = group_norm(self.norm_groups, self.norm_eps, "group_norm",
                     **norm_kwargs(self.param_dtype))(x)
    x = x.reshape(shape[0], -1, shape[-1])
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, "to_q", axes=(EMBED, HEADS), use_bias=self.qkv_bias, **kw)(x)
    k = dense(inner, "to_k", axes=(EMBED, HEADS), use_bias=self.qkv_bias, **kw)(context)
    v = dense(inner, "to_v", axes=(EMBED, HEADS), use_bias=self.qkv_bias, **kw)(context)
    out = attention(q, k, v, num_heads=self.heads, upcast=self.upcast,
                    implementation=self.implementation)
    out = dense(shape[-1], "to_out_0", axes=(HEADS, EMBED), **kw)(out).reshape(shape)
    return out + residual if self.residual else out


class GEGLU(nn.Module):
  """proj to 2 * features, then value * gelu(gate) with exact (erf) GELU as torch's default."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = dense(2 * self.features, "proj", axes=(EMBED, MLP), dtype=self.dtype,
              param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: net_0 (GEGLU), net_1 (dropout, no params), net_2."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, name="net_0", **kw)(x)
    return dense(dim, "net_2", axes=(MLP, EMBED), **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

  `only_cross_attention` makes attn1 attend to the text as well (diffusers semantics).
  """
  heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast: bool = False
  norm_eps: float = 1e-5
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = functools.partial(Attention, self.heads, self.head_dim, upcast=self.upcast,
                             implementation=self.implementation, **kw)
    nkw = norm_kwargs(self.param_dtype)
    h = layer_norm(self.norm_eps, "norm1", **nkw)(x)
    x = x + attn(name="attn1")(h, context if self.only_cross_attention else None)
    h = layer_norm(self.norm_eps, "norm2", **nkw)(x)
    x = x + attn(name="attn2")(h, context)
    h = layer_norm(self.norm_eps, "norm3", **nkw)(x)
    return x + FeedForward(name="ff", **kw)(h)


class Transformer2DModel(nn.Module):
  """GroupNorm, proj_in (1x1 conv, or linear with `use_linear_projection`), transformer
  blocks over the H*W tokens, proj_out, plus the input (the spatial transformer of SD)."""
  heads: int
  head_dim: int
  num_layers: int = 1
  norm_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  remat: bool = False
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, channels = x.shape
    inner = self.heads * self.head_dim
    if self.use_linear_projection:
      proj_in = dense(inner, "proj_in", axes=(EMBED, HEADS), **kw)
      proj_out = dense(channels, "proj_out", axes=(HEADS, EMBED), **kw)
    else:  # a 1x1 conv is a dense layer over channels; kept as conv for the weight layout
      proj_in = conv(inner, "proj_in", kernel_size=1, **kw)
      proj_out = conv(channels, "proj_out", kernel_size=1, **kw)
    h = proj_in(group_norm(self.norm_groups, 1e-6, "norm", **norm_kwargs(self.param_dtype))(x))
    h = h.reshape(b, hgt * wid, inner)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for i in range(self.num_layers):
      h = block_cls(self.heads, self.head_dim, self.only_cross_attention, self.upcast,
                    implementation=self.implementation, name=f"transformer_blocks_{i}", **kw)(
                        h, context)
    return proj_out(h.reshape(b, hgt, wid, inner)) + x


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE's asymmetric pad (bottom/right only), as in
  diffusers."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
    return conv(self.out_channels, "conv", stride=2, padding=pad, dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest upsampling of NHWC `x` to 2x, or to `size` with torch's rule src = floor(i*in/out)."""
  in_h, in_w = x.shape[1:3]
  if size is None or tuple(size) == (2 * in_h, 2 * in_w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  out_h, out_w = size
  rows = np.arange(out_h) * in_h // out_h  # static indices: XLA sees a constant gather
  cols = np.arange(out_w) * in_w // out_w
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class Upsample2D(nn.Module):
  """Nearest upsampling (2x, or to the skip connection's size) then a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    return conv(self.out_channels, "conv", dtype=self.dtype, param_dtype=self.param_dtype)(
        upsample_nearest(x, size))
