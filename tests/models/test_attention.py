"""Every attention implementation against the XLA path and torch's SDPA: outputs and gradients.

Tolerances (issue 16): fp32 forward and gradient within 1e-5 of the XLA path (relative to the
largest reference value, at least 1); bf16 within a relative 3e-2. Shapes are chosen so that the
blocked kernel runs several query blocks, padded queries and keys, and (with a small
`block_k`) the online softmax over several key blocks.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medjax.models import attention as attention_lib

HEADS, HEAD_DIM = 3, 8


def _inputs(tq, tk, dtype=jnp.float32, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  arr = lambda t: jnp.asarray(rng.standard_normal((batch, t, HEADS * HEAD_DIM)), dtype)
  return arr(tq), arr(tk), arr(tk), arr(tq)


def _value_and_grads(implementation, q, k, v, w, **kwargs):
  """attention(...) and the gradient of sum(out * w) with respect to q, k, v."""
  def loss(q, k, v):
    out = attention_lib.attention(q, k, v, num_heads=HEADS, implementation=implementation,
                                  **kwargs)
    return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return [np.asarray(x, np.float32) for x in (out, *grads)]


def _assert_close(got, expected, rtol):
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err <= rtol, f"{name}: error {err:.2e} > {rtol:.0e}"


def _blocked(monkeypatch, block_q, block_k):
  monkeypatch.setattr(attention_lib, "blocked_attention", functools.partial(
      attention_lib.blocked_attention, block_q=block_q, block_k=block_k))


@pytest.mark.parametrize("blocks", [(attention_lib.BLOCK_Q, None), (32, 24)],
                         ids=["default_blocks", "online_softmax"])
@pytest.mark.parametrize("tq,tk,kwargs", [
    (300, 300, {}),                   # self-attention, T not a multiple of the blocks
    (200, 77, {}),                    # cross-attention to 77 text tokens
    (77, 77, {"is_causal": True}),    # CLIP's causal mask
    (90, 50, {"mask": "padding"}),    # a boolean key-padding mask [B, 1, 1, Tk]
    (60, 60, {"mask": "random"}),     # an arbitrary [B, 1, Tq, Tk] mask
], ids=["self", "cross77", "causal", "padding_mask", "random_mask"])
def test_blocked_matches_xla_fp32(monkeypatch, blocks, tq, tk, kwargs):
  _blocked(monkeypatch, *blocks)
  q, k, v, w = _inputs(tq, tk)
  rng = np.random.default_rng(1)
  if kwargs.get("mask") == "padding":
    lengths = np.array([tk, tk // 3])
    kwargs = {"mask": jnp.asarray(np.arange(tk)[None, None, None] < lengths[:, None, None, None])}
  elif kwargs.get("mask") == "random":
    kwargs = {"mask": jnp.asarray(rng.random((2, 1, tq, tk)) > 0.4)}
  expected = _value_and_grads("xla", q, k, v, w, **kwargs)
  _assert_close(_value_and_grads("blocked", q, k, v, w, **kwargs), expected, 1e-5)


@pytest.mark.parametrize("blocks", [(attention_lib.BLOCK_Q, None), (32, 24)],
                         ids=["default_blocks", "online_softmax"])
def test_blocked_matches_xla_bf16(monkeypatch, blocks):
  _blocked(monkeypatch, *blocks)
  q, k, v, w = _inputs(150, 100, jnp.bfloat16)
  expected = _value_and_grads("xla", q, k, v, w, is_causal=True)
  got = _value_and_grads("blocked", q, k, v, w, is_causal=True)
  assert got[0].dtype == np.float32 and np.isfinite(got[1]).all()
  _assert_close(got, expected, 3e-2)


def test_blocked_matches_torch_sdpa():
  """The external oracle: torch's scaled_dot_product_attention, forward and gradients."""
  q, k, v, w = _inputs(130, 77)
  tensors = [torch.from_numpy(np.array(x)).requires_grad_(True) for x in (q, k, v)]
  split = lambda x: x.view(2, -1, HEADS, HEAD_DIM).transpose(1, 2)
  out = F.scaled_dot_product_attention(*map(split, tensors)).transpose(1, 2).reshape(2, 130, -1)
  grads = torch.autograd.grad((out * torch.from_numpy(np.asarray(w))).sum(), tensors)
  expected = [out.detach().numpy(), *(g.numpy() for g in grads)]
  _assert_close(_value_and_grads("blocked", q, k, v, w), expected, 1e-5)


@pytest.mark.parametrize("tq,tk,kwargs", [(77, 77, {"is_causal": True}), (130, 77, {})],
                         ids=["causal", "cross77"])
def test_pallas_tpu_matches_xla_in_interpret_mode(tq, tk, kwargs):
  """Off TPU the Pallas kernel runs in its interpreter: the same numbers, forward and backward."""
  q, k, v, w = _inputs(tq, tk, batch=1)
  expected = _value_and_grads("xla", q, k, v, w, **kwargs)
  _assert_close(_value_and_grads("pallas_tpu", q, k, v, w, **kwargs), expected, 1e-5)


def test_pallas_tpu_refuses_a_mask():
  q, k, v, _ = _inputs(8, 8)
  with pytest.raises(ValueError, match="no explicit mask"):
    attention_lib.attention(q, k, v, num_heads=HEADS, mask=jnp.ones((8, 8), bool),
                            implementation="pallas_tpu")


@pytest.mark.parametrize("backend,dtype,head_dim,has_mask,lengths,expected", [
    ("cpu", jnp.float32, 40, False, (4096, 4096), "blocked"),
    ("cpu", jnp.bfloat16, 40, False, (4096, 77), "blocked"),
    ("gpu", jnp.bfloat16, 40, False, (4096, 4096), "cudnn"),
    ("gpu", jnp.float16, 64, True, (1024, 1024), "cudnn"),
    ("gpu", jnp.bfloat16, 40, False, (4096, 77), "xla"),  # cuDNN's backward refuses odd lengths
    ("gpu", jnp.bfloat16, 64, False, (77, 77), "xla"),    # CLIP's 77 tokens
    ("gpu", jnp.float32, 40, False, (4096, 4096), "xla"),  # cuDNN's flash kernel: bf16/fp16
    ("gpu", jnp.bfloat16, 512, False, (4096, 4096), "xla"),  # the VAE's 512-wide single head
    ("gpu", jnp.bfloat16, 36, False, (1024, 1024), "xla"),  # head_dim not a multiple of 8
    ("tpu", jnp.float32, 40, False, (4096, 77), "pallas_tpu"),
    ("tpu", jnp.bfloat16, 40, True, (4096, 4096), "blocked"),  # the Pallas kernel takes no mask
])
def test_auto_picks_by_backend(monkeypatch, backend, dtype, head_dim, has_mask, lengths, expected):
  monkeypatch.setattr(attention_lib, "_backend", lambda: backend)
  assert attention_lib.resolve("auto", dtype, head_dim, has_mask, *lengths) == expected
  assert attention_lib.resolve("xla", dtype, head_dim, has_mask, *lengths) == "xla"


def test_unknown_implementation_is_refused():
  q, k, v, _ = _inputs(4, 4)
  with pytest.raises(ValueError, match="'flash' not in"):
    attention_lib.attention(q, k, v, num_heads=HEADS, implementation="flash")


def test_blocked_backward_holds_no_logits():
  """The point of the custom VJP: the gradient's buffers stay far below one T x T logit map.
  (T = 4096: blocked's temporaries are a few logit tiles of ~4 MB each, whatever T is.)"""
  t, heads, head_dim = 4096, 2, 8
  q = jnp.zeros((1, t, heads * head_dim))
  grad = lambda impl: jax.jit(jax.grad(lambda q: attention_lib.attention(
      q, q, q, num_heads=heads, implementation=impl).sum()))
  temp = lambda impl: grad(impl).lower(q).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = heads * t * t * 4
  assert temp("xla") >= logits_bytes  # the reference keeps the logits (what this guards)
  assert temp("blocked") < logits_bytes / 4


def test_key_blocks_keep_one_tile_of_logits_near_the_budget():
  assert attention_lib.key_block(8) == 512       # SD1.5: 8 heads x 256 rows x 512 keys = 4 MB
  assert attention_lib.key_block(1) == 4096      # the VAE's single head: one block up to 4096
  assert attention_lib.key_block(64) == attention_lib.MIN_BLOCK_K
