"""Shared blocks whose exact rules the whole-model tests only reach for a few sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding as torch_timestep_embedding

from medjax.models import layers


@pytest.mark.parametrize("in_hw,out_hw", [
    ((3, 2), (5, 4)), ((5, 4), (9, 7)), ((4, 4), (8, 8)), ((3, 5), (7, 11)), ((2, 3), (3, 3))])
def test_upsample_nearest_matches_torch_interpolate(in_hw, out_hw):
  x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="nearest")
  np.testing.assert_array_equal(layers.upsample_nearest(x, out_hw),
                                expected.permute(0, 2, 3, 1).numpy())


def test_upsample_nearest_default_is_2x():
  x = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2.0,
                           mode="nearest").permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(layers.upsample_nearest(x), expected)


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0), (32, False, 1), (33, True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
  t = np.array([0, 1, 17.5, 999], np.float32)
  expected = torch_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                      downscale_freq_shift=shift).numpy()
  got = layers.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  # exp() may differ by an ulp between XLA and torch; times t ~ 1e3 rad: measured 2.8e-5.
  np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,cin,cout", [
    (3, 1, ((1, 1), (1, 1)), 8, 96), (3, 2, ((1, 1), (1, 1)), 8, 32),
    (3, 2, ((0, 1), (0, 1)), 8, 32), (1, 1, ((0, 0), (0, 0)), 8, 4)])
def test_conv_matmul_path_matches_lax_conv(kernel, stride, padding, cin, cout):
  """The im2col matmul that stands in for XLA:CPU's conv: same values and gradients."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 4, cin)).astype(np.float32)
  w = (0.2 * rng.standard_normal((kernel, kernel, cin, cout))).astype(np.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  args = ((stride, stride), padding, None, None, dn)
  assert layers._im2col_applies(x, w, *args, 1)  # pylint: disable=protected-access
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args)))
  want = jax.jit(jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(loss(layers.conv_general_dilated), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on_cpu", [True, False])
def test_layer_norm_matches_flax_values_and_gradients(on_cpu, monkeypatch):
  """Both LayerNorm paths (CPU: matmul statistics and a written-out gradient) against flax's."""
  monkeypatch.setattr(layers, "_on_cpu", lambda: on_cpu)
  rng = np.random.default_rng(0)
  x = (3 + 2 * rng.standard_normal((2, 7, 48))).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  params = {"scale": (1 + 0.1 * rng.standard_normal(48)).astype(np.float32),
            "bias": (0.1 * rng.standard_normal(48)).astype(np.float32)}
  ours = layers.LayerNorm(1e-5)
  theirs = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
  assert (jax.tree.structure(nn.unbox(ours.init(jax.random.key(0), x)))
          == jax.tree.structure(theirs.init(jax.random.key(0), x)))
  loss = lambda m: lambda p, x: jnp.sum(m.apply({"params": p}, x) * g)
  want = jax.jit(jax.value_and_grad(loss(theirs), (0, 1)))(params, x)
  got = jax.jit(jax.value_and_grad(loss(ours), (0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
