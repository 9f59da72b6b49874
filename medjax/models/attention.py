"""Multi-head scaled dot-product attention, one implementation per backend.

`attention(...)` is what every model calls; `implementation` picks the kernel.
"""
import functools

import jax
import jax.numpy as jnp

# Attention implementations accepted by `attention(...)`: 'xla' lets XLA fuse the einsums,
# 'cudnn' uses cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16 only), 'auto' picks cudnn
# when it applies and falls back to xla otherwise.
IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
              mask: jax.Array | None = None, is_causal: bool = False,
              upcast: bool = False, implementation: str = "auto") -> jax.Array:
  """Multi-head scaled dot-product attention on [B, T, H*D] inputs -> [B, T, H*D].

  `upcast`: logits and softmax in fp32 (diffusers' `upcast_attention`, needed by SD2.1 in
  fp16/bf16); always the case here, see below. `mask` is boolean, broadcastable to
  [B, H, Tq, Tk], True = attend.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in "
                     f"{IMPLEMENTATIONS}")
  b, tq, width = q.shape
  head_dim = width // num_heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
  q, k, v = split(q), split(k), split(v)
  out_dtype = q.dtype
  # `upcast` asks for fp32 logits and softmax. Both implementations already compute them in
  # fp32 for bf16/fp16 inputs (XLA: preferred_element_type=f32; cuDNN: fp32 accumulators), as
  # diffusers' upcast path does, so q/k/v stay in the compute dtype and cuDNN stays usable.
  del upcast
  impl = None if implementation in ("auto", "xla") else implementation
  if implementation == "auto" and _cudnn_applies(q, head_dim):
    impl = "cudnn"
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)
  return out.astype(out_dtype).reshape(b, tq, width)


@functools.cache
def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _cudnn_applies(q: jax.Array, head_dim: int) -> bool:
  return (_on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim <= 128 and head_dim % 8 == 0)
