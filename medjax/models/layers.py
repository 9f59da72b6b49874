"""Building blocks shared by the U-Net, the VAE and the text encoder.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) so that configs can
shard them over a mesh with rules such as `('embed', 'fsdp')`. Compute runs in `dtype`
(e.g. bf16) while params stay in `param_dtype` (fp32). Tensors are NHWC / [batch, tokens, dim].
Names of submodules follow diffusers/transformers so `medjax.convert.diffusers` maps them 1:1.
"""
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
      dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (CONV_H, CONV_W, CONV_IN, CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)))


def group_norm(num_groups: int, epsilon: float, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm over channels (last axis), statistics in fp32 as PyTorch does under autocast."""
  # Two-pass variance (as PyTorch): E[x^2]-E[x]^2 loses digits when |mean| >> std.
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))


def layer_norm(epsilon: float, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))


def embed(num_embeddings: int, features: int, name: str, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Embed:
  return nn.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype, name=name,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (VOCAB, EMBED)))


# Attention implementations accepted by `attention(...)`: 'xla' lets XLA fuse the einsums,
# 'cudnn' uses cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16 only), 'auto' picks cudnn
# when it applies and falls back to xla otherwise.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
              mask: jax.Array | None = None, is_causal: bool = False,
              upcast: bool = False, implementation: str = "auto") -> jax.Array:
  """Multi-head scaled dot-product attention on [B, T, H*D] inputs -> [B, T, H*D].

  `upcast` computes the softmax logits in fp32 (diffusers' `upcast_attention`, needed by SD2.1
  in fp16/bf16). `mask` is boolean, broadcastable to [B, H, Tq, Tk], True = attend.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {ATTENTION_IMPLEMENTATIONS}")
  b, tq, width = q.shape
  head_dim = width // num_heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
  q, k, v = split(q), split(k), split(v)
  out_dtype = q.dtype
  if upcast:
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  impl = None if implementation in ("auto", "xla") else implementation
  if implementation == "auto" and _cudnn_applies(q, head_dim):
    impl = "cudnn"
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
  return out.astype(out_dtype).reshape(b, tq, width)


@functools.lru_cache(maxsize=None)
def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _cudnn_applies(q: jax.Array, head_dim: int) -> bool:
  return (_on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim <= 128 and head_dim % 8 == 0)
