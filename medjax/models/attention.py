"""Multi-head scaled dot-product attention, one implementation per backend.

`attention(...)` is what every model calls; `implementation` picks the kernel:
- 'xla': `jax.nn.dot_product_attention`'s XLA path. It materialises the [B, H, Tq, Tk] logits
  and streams them through memory several times (34-54 ms at T=1024 on the 2-core CPU, where
  the same math in blocks takes ~5 ms) and keeps them for the backward pass (0.5 GB per layer
  at SD1.5's 64x64 latents).
- 'blocked': flash-style attention in plain JAX (`blocked_attention`): query blocks of
  `BLOCK_Q` rows, key blocks (`key_block`) with an online softmax, and a `jax.custom_vjp`
  whose backward recomputes each block from the saved log-sum-exp, so neither pass holds the
  T x T logits. Runs everywhere; the default where no fused kernel applies.
- 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (bf16/fp16, head_dim <= 128, % 8;
  its backward refuses odd sequence lengths such as the 77 text tokens, seen on an H200).
- 'pallas_tpu': JAX's Pallas TPU flash-attention kernel (as maxdiffusion uses on TPU), keys
  padded to its 128-row blocks and masked with segment ids. Off TPU it runs in Pallas' TPU
  interpret mode, slowly, which is how the tests check it; it is unmeasured on real TPUs.
- 'auto': on GPU cudnn where it applies, else xla (on an H200 in bf16 XLA's fused softmax ran
  1.5-3x faster than 'blocked', whose block loop serialises small kernels); on TPU pallas_tpu
  without an explicit mask; elsewhere (CPU) and for masked TPU calls, blocked.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

IMPLEMENTATIONS = ("auto", "xla", "blocked", "cudnn", "pallas_tpu")

# Block sizes of 'blocked', from benchmarks/attention.py on 2-core CPUs (fp32; sweeps in
# README "Benchmarks"): query blocks of 256 rows; keys in blocks that keep one block's logits
# (heads x BLOCK_Q x block_k) near TILE_LOGITS (4 MB fp32, about the L2 cache), at least
# MIN_BLOCK_K keys. At SD1.5's 64x64 latents (8 heads, T=4096) that is 512 keys: on an Intel
# machine q256/k512 tied q128/k1024 (~1.4x faster than one 4,096-key block), on an AMD EPYC
# it was 21-25% faster forward and 13-14% backward (interleaved A/B, 2026-12-02); the VAE's
# single 512-wide head keeps one block.
BLOCK_Q = 256
TILE_LOGITS = 1 << 20
MIN_BLOCK_K = 512


def key_block(heads: int, block_q: int = BLOCK_Q) -> int:
  return max(MIN_BLOCK_K, TILE_LOGITS // (heads * block_q))


# As jax.nn.dot_product_attention: a finite "minus infinity", so a fully masked row averages
# its values instead of producing NaN, and masked entries underflow to exactly 0.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_PALLAS_BLOCK = 128


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_heads: int,
              mask: jax.Array | None = None, is_causal: bool = False,
              upcast: bool = False, implementation: str = "auto") -> jax.Array:
  """Multi-head scaled dot-product attention on [B, T, H*D] inputs -> [B, T, H*D].

  `upcast`: logits and softmax in fp32 (diffusers' `upcast_attention`, needed by SD2.1 in
  fp16/bf16); always the case here: every implementation computes logits and softmax in fp32
  for bf16/fp16 inputs, so q/k/v stay in the compute dtype. `mask` is boolean, broadcastable
  to [B, H, Tq, Tk], True = attend.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
  del upcast
  b, tq, width = q.shape
  head_dim = width // num_heads
  split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, head_dim)
  q, k, v = split(q), split(k), split(v)
  out_dtype = q.dtype
  impl = resolve(implementation, q.dtype, head_dim, mask is not None, tq, k.shape[1])
  if impl in ("blocked", "pallas_tpu"):
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    kernel = blocked_attention if impl == "blocked" else pallas_tpu_attention
    out = heads_first(kernel(heads_first(q), heads_first(k), heads_first(v), mask=mask,
                             is_causal=is_causal))
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=None if impl == "xla" else impl)
  return out.astype(out_dtype).reshape(b, tq, width)


def resolve(implementation: str, dtype, head_dim: int, has_mask: bool, q_len: int,
            kv_len: int) -> str:
  """The implementation 'auto' stands for on this backend (others are returned as given)."""
  if implementation != "auto":
    return implementation
  backend = _backend()
  if backend == "gpu":
    cudnn = (dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0
             and q_len % 2 == 0 and kv_len % 2 == 0)
    return "cudnn" if cudnn else "xla"
  if backend == "tpu" and not has_mask:
    return "pallas_tpu"
  return "blocked"


@functools.cache
def _backend() -> str:
  return jax.default_backend()


# ---------------------------------------------------------------------------------------------
# 'blocked': flash attention in plain JAX, heads-first [B, H, T, D] layout.


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                      *, is_causal: bool = False, scale: float | None = None,
                      block_q: int = BLOCK_Q, block_k: int | None = None) -> jax.Array:
  """softmax(q k^T * scale + mask) v over [B, H, T, D] inputs, in blocks, O(T) extra memory.

  `block_k` None: `key_block(heads, block_q)`.
  Sequences that are not multiples of the blocks are padded; padded keys are masked and
  padded queries dropped. `mask` is boolean, broadcastable to [B, H, Tq, Tk].
  """
  tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
  block_k = key_block(q.shape[1], block_q) if block_k is None else block_k
  block_q, block_k = min(block_q, tq), min(block_k, tk)
  pad_q, pad_k = -tq % block_q, -tk % block_k
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0))) if n else x
  if mask is not None:
    mask = jnp.broadcast_to(mask, (*mask.shape[:-2], tq, tk)) if mask.ndim >= 2 else mask
    mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)))
  spec = _Spec(block_q, block_k, tk, is_causal, 1.0 / math.sqrt(d) if scale is None else scale)
  out = _flash(spec, pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), mask)
  return out[:, :, :tq]


class _Spec(tuple):
  """Static settings of one blocked call (hashable, so custom_vjp can take it as nondiff)."""

  def __new__(cls, block_q, block_k, kv_len, is_causal, scale):
    return super().__new__(cls, (block_q, block_k, kv_len, is_causal, scale))

  block_q = property(lambda s: s[0])
  block_k = property(lambda s: s[1])
  kv_len = property(lambda s: s[2])
  is_causal = property(lambda s: s[3])
  scale = property(lambda s: s[4])


def _logits(spec: _Spec, qi, kj, mask, i, j) -> jax.Array:
  """Masked fp32 logits of (pre-scaled) query block i against key block j: [B, H, bq, bk]."""
  s = jnp.einsum("bhqd,bhkd->bhqk", qi, kj, preferred_element_type=jnp.float32)
  rows = i * spec.block_q + jnp.arange(spec.block_q)[:, None]
  cols = j * spec.block_k + jnp.arange(spec.block_k)[None, :]
  valid = None
  if spec.kv_len % spec.block_k:  # padded keys
    valid = cols < spec.kv_len
  if spec.is_causal:
    valid = rows >= cols if valid is None else valid & (rows >= cols)
  if mask is not None:
    block = mask
    if mask.shape[2] > 1:
      block = jax.lax.dynamic_slice_in_dim(block, i * spec.block_q, spec.block_q, axis=2)
    if mask.shape[3] > 1:
      block = jax.lax.dynamic_slice_in_dim(block, j * spec.block_k, spec.block_k, axis=3)
    valid = block if valid is None else valid & block
  return s if valid is None else jnp.where(valid, s, _MASKED)


def _blocks(x: jax.Array, size: int) -> jax.Array:
  """[B, H, T, D] -> [T // size, B, H, size, D]: the leading axis is what loops run over."""
  b, h, t, d = x.shape
  return x.reshape(b, h, t // size, size, d).transpose(2, 0, 1, 3, 4)


def _unblocks(x: jax.Array) -> jax.Array:
  n, b, h, size = x.shape[:4]
  return x.transpose(1, 2, 0, 3, *range(4, x.ndim)).reshape(b, h, n * size, *x.shape[4:])


def _forward(spec: _Spec, q, k, v, mask):
  """Output [B, H, Tq, D] and the log-sum-exp of each row [B, H, Tq] (fp32)."""
  kb, vb = _blocks(k, spec.block_k), _blocks(v, spec.block_k)
  nk = kb.shape[0]

  def query_block(args):
    i, qi = args
    if nk == 1:  # one key block: a plain softmax
      s = _logits(spec, qi, kb[0], mask, i, 0)
      m = s.max(axis=-1)
      p = jnp.exp(s - m[..., None])
      total = p.sum(axis=-1)
      acc = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vb[0],
                       preferred_element_type=jnp.float32)
    else:  # online softmax over key blocks
      def key_block(carry, j):
        m, total, acc = carry
        s = _logits(spec, qi, kb[j], mask, i, j)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        total = total * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum(
            "bhqk,bhkd->bhqd", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
        return (m_new, total, acc), None
      shape = qi.shape[:-1]
      init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
              jnp.zeros((*shape, v.shape[-1]), jnp.float32))
      (m, total, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nk))
    return (acc / total[..., None]).astype(q.dtype), m + jnp.log(total)

  qb = _blocks(q, spec.block_q)
  out, lse = jax.lax.map(query_block, (jnp.arange(qb.shape[0]), qb))
  return _unblocks(out), _unblocks(lse[..., None])[..., 0]


def _scaled(spec: _Spec, q: jax.Array) -> jax.Array:
  """q * scale: scaling the [.., T, D] queries once, not every [.., bq, bk] logits block."""
  return (q.astype(jnp.float32) * spec.scale).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v, mask):
  return _forward(spec, _scaled(spec, q), k, v, mask)[0]


def _flash_fwd(spec, q, k, v, mask):
  q = _scaled(spec, q)
  out, lse = _forward(spec, q, k, v, mask)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(spec, residuals, d_out):
  """FlashAttention-2's backward: per query block, recompute p = exp(s - lse) per key block.

  dk and dv are formed transposed ([.., D, bk] = q^T ds, do^T p): XLA:CPU contracts a logits
  block over its rows (p^T do) ~10x slower than over its columns (1.9 vs 0.2 ms for 8 heads x
  128 x 1024 x 8 on the 2-core CPU), so the keys' gradients stay in [B, H, D, Tk] until the end.
  """
  q, k, v, mask, out, lse = residuals  # q is pre-scaled
  delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  kb, vb = _blocks(k, spec.block_k), _blocks(v, spec.block_k)
  nk = kb.shape[0]
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

  def block_grads(i, qi, doi, lse_i, delta_i, j):
    s = _logits(spec, qi, kb[j], mask, i, j)
    p = jnp.exp(s - lse_i[..., None])
    dv_t = f32("bhqd,bhqk->bhdk", doi, p.astype(doi.dtype))
    dp = f32("bhqd,bhkd->bhqk", doi, vb[j])
    ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
    return f32("bhqk,bhkd->bhqd", ds, kb[j]), f32("bhqd,bhqk->bhdk", qi, ds), dv_t

  def query_block(carry, args):
    dk_t, dv_t = carry
    i, qi, doi, lse_i, delta_i = args
    if nk == 1:
      dq, dk_i, dv_i = block_grads(i, qi, doi, lse_i, delta_i, 0)
      return (dk_t + dk_i, dv_t + dv_i), dq
    def key_block(dq, j):
      dq_j, dk_j, dv_j = block_grads(i, qi, doi, lse_i, delta_i, j)
      return dq + dq_j, (dk_j, dv_j)
    dq, (dk_i, dv_i) = jax.lax.scan(key_block, jnp.zeros(qi.shape, jnp.float32),
                                    jnp.arange(nk))
    keys_last = lambda x: jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)
    return (dk_t + keys_last(dk_i), dv_t + keys_last(dv_i)), dq

  transposed = lambda x: jnp.zeros((*x.shape[:2], x.shape[3], x.shape[2]), jnp.float32)
  qb = _blocks(q, spec.block_q)
  rows = lambda x: _blocks(x[..., None], spec.block_q)[..., 0]
  (dk_t, dv_t), dq = jax.lax.scan(
      query_block, (transposed(k), transposed(v)),
      (jnp.arange(qb.shape[0]), qb, _blocks(d_out, spec.block_q), rows(lse), rows(delta)))
  dq = _unblocks(dq) * spec.scale
  return (dq.astype(q.dtype), dk_t.swapaxes(-1, -2).astype(k.dtype),
          dv_t.swapaxes(-1, -2).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# 'pallas_tpu': JAX's Pallas TPU flash attention, heads-first [B, H, T, D] layout.


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: jax.Array | None = None, *, is_causal: bool = False) -> jax.Array:
  """The Pallas TPU kernel with sequences padded to its blocks; padded keys get segment 0."""
  if mask is not None:
    raise ValueError("attention implementation 'pallas_tpu' takes no explicit mask; "
                     "use 'blocked' or 'xla'")
  kernel = functools.partial(_pallas_padded, is_causal=is_causal)
  return kernel(q, k, v) if _backend() == "tpu" else _interpreted(kernel, q, k, v)


def _pallas_padded(q, k, v, *, is_causal: bool):
  b, _, tq, d = q.shape
  tk = k.shape[2]
  pad_q, pad_k = -tq % _PALLAS_BLOCK, -tk % _PALLAS_BLOCK
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0))) if n else x
  segments = None
  if pad_k:
    kv_ids = jnp.broadcast_to((jnp.arange(tk + pad_k) < tk).astype(jnp.int32), (b, tk + pad_k))
    segments = pallas_flash.SegmentIds(q=jnp.ones((b, tq + pad_q), jnp.int32), kv=kv_ids)
  out = pallas_flash.flash_attention(pad(q, pad_q), pad(k, pad_k), pad(v, pad_k),
                                     segment_ids=segments, causal=is_causal,
                                     sm_scale=1.0 / math.sqrt(d))
  return out[:, :, :tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _interpreted(kernel, q, k, v):
  """`kernel` under Pallas' TPU interpreter, its backward too (traced later, outside a `with`)."""
  with pltpu.force_tpu_interpret_mode():
    return kernel(q, k, v)


def _interpreted_fwd(kernel, q, k, v):
  with pltpu.force_tpu_interpret_mode():
    return jax.vjp(kernel, q, k, v)


def _interpreted_bwd(kernel, vjp, d_out):
  del kernel
  with pltpu.force_tpu_interpret_mode():
    return vjp(d_out)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)
