"""FID statistics, Fréchet distance and KID against pytorch-fid and torchmetrics; bad input.

Nothing here runs the Inception network (test_inception.py covers it, compiled once): the
metrics are checked on random feature matrices, and bad images are rejected before any
compile, so an empty variables dict stands in for the weights.
"""
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from medjax.errors import MedjaxError
from medjax.eval import fid

NO_WEIGHTS = {}  # bad input must fail before the network is used


def _features(seed, n=40, d=32, shift=0.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift).astype(
      np.float32)


def test_statistics_as_pytorch_fid():
  f = _features(0)
  mu, sigma = fid.statistics(f)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, np.mean(f.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_array_equal(sigma, np.cov(f, rowvar=False))


@pytest.mark.parametrize("n", [200, 5])  # full-rank covariances, and singular ones (n < d)
def test_frechet_distance_matches_pytorch_fid(n):
  stats_a = fid.statistics(_features(1, n=n))
  stats_b = fid.statistics(_features(2, n=n, shift=0.2))
  theirs = calculate_frechet_distance(*stats_a, *stats_b)
  np.testing.assert_allclose(fid.frechet_distance(*stats_a, *stats_b), theirs, rtol=1e-10)
  # Self-distance is 0 up to sqrtm's rounding (-4e-6 measured for the singular n=5 case).
  assert fid.frechet_distance(*stats_a, *stats_a) == pytest.approx(0, abs=1e-4)


def test_frechet_distance_eps_offset_when_sqrtm_not_finite(monkeypatch):
  """The first sqrtm of each call returns NaN: both add eps to the diagonals and agree."""
  real_sqrtm, calls = scipy.linalg.sqrtm, []

  def flaky_sqrtm(a, *args, **kwargs):
    calls.append(1)
    out = real_sqrtm(a, *args, **kwargs)
    if len(calls) % 2 == 1:
      return (np.full_like(out[0], np.nan), out[1]) if isinstance(out, tuple) else out * np.nan
    return out

  monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
  stats_a, stats_b = fid.statistics(_features(3)), fid.statistics(_features(4, shift=0.1))
  theirs = calculate_frechet_distance(*stats_a, *stats_b, eps=1e-2)
  with pytest.warns(RuntimeWarning, match="singular product; adding 0.01"):
    ours = fid.frechet_distance(*stats_a, *stats_b, eps=1e-2)
  np.testing.assert_allclose(ours, theirs, rtol=1e-10)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    plain = calculate_frechet_distance(*stats_a, *stats_b)  # 3rd call: NaN again, offset path
  assert ours != plain  # eps mattered, so the offset path really ran


def test_frechet_distance_rejects_imaginary_and_bad_shapes():
  mu = np.zeros(2)
  with pytest.raises(MedjaxError, match="imaginary component"):
    fid.frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
  with pytest.raises(ValueError, match="Imaginary component"):  # pytorch-fid agrees
    calculate_frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
  with pytest.raises(MedjaxError, match="different shapes"):
    fid.frechet_distance(mu, np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(MedjaxError, match="do not match the means"):
    fid.frechet_distance(mu, np.eye(3), mu, np.eye(3))
  with pytest.raises(MedjaxError, match="sigma2 has non-finite"):
    fid.frechet_distance(mu, np.eye(2), mu, np.full((2, 2), np.nan))


def test_statistics_bad_input():
  with pytest.raises(MedjaxError, match="1 sample"):
    fid.statistics(np.zeros((1, 2048)))
  with pytest.raises(MedjaxError, match=r"expected \[N, D\]"):
    fid.statistics(np.zeros(2048))
  f = _features(5)
  f[3, 7] = np.nan
  with pytest.raises(MedjaxError, match="non-finite"):
    fid.statistics(f)


def test_kid_poly_mmd_matches_torchmetrics():
  a, b = _features(6, n=30), _features(7, n=30, shift=0.1)
  x, y = a.astype(np.float64), b.astype(np.float64)
  theirs = poly_mmd(torch.from_numpy(x), torch.from_numpy(y)).item()
  ours = fid._poly_mmd(x, y, degree=3, gamma=1 / x.shape[1], coef=1.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(ours, theirs, rtol=1e-12)
  # One subset of the whole set: the estimator is order-free, so torchmetrics' class (random
  # permutations) and ours (seeded choice) give the same number.
  metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=30)
  metric.update(torch.from_numpy(x), real=True)
  metric.update(torch.from_numpy(y), real=False)
  mean, std = fid.kid(a, b, subsets=1, subset_size=30)
  np.testing.assert_allclose(mean, metric.compute()[0].item(), rtol=1e-10)
  assert std == 0


def test_kid_subsets_are_seeded_means_of_poly_mmd():
  a, b = _features(8, n=50), _features(9, n=60, shift=0.3)
  mean, std = fid.kid(a, b, subsets=7, subset_size=20, seed=3)
  rng = np.random.default_rng(3)
  scores = []
  for _ in range(7):
    x = a.astype(np.float64)[rng.choice(50, 20, replace=False)]
    y = b.astype(np.float64)[rng.choice(60, 20, replace=False)]
    scores.append(poly_mmd(torch.from_numpy(x), torch.from_numpy(y)).item())
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  assert fid.kid(a, b, subsets=7, subset_size=20, seed=3) == (mean, std)
  assert fid.kid(a, b, subsets=3, subset_size=10_000)[0] == pytest.approx(
      fid.kid(a, b, subsets=3, subset_size=50)[0])  # capped at the smaller set, as clean-fid


def test_kid_bad_input():
  with pytest.raises(MedjaxError, match="at least 2"):
    fid.kid(_features(0, n=1), _features(1))
  with pytest.raises(MedjaxError, match="feature dims differ"):
    fid.kid(_features(0, d=8), _features(1, d=16))
  f = _features(2)
  f[0, 0] = np.inf
  with pytest.raises(MedjaxError, match="features_b has non-finite"):
    fid.kid(_features(0), f)


@pytest.mark.parametrize("images,match", [
    ([np.zeros((32, 32, 3)), np.zeros((32, 40, 3))], r"images\[1\] has shape \(32, 40, 3\) but"),
    ([np.zeros((32, 32, 3)), np.zeros((32, 32, 1))], r"images\[1\] has shape .* channel count"),
    (np.zeros((2, 32, 32, 2)), "2 channels, expected 1"),
    (np.zeros((32, 32, 3)), r"expected an array \[N, H, W, C\]"),
    (np.zeros((0, 32, 32, 3)), "empty"),
    (np.full((2, 8, 8, 3), 1.5), r"values in \[1.5, 1.5\], expected \[0, 1\]"),
    (np.where(np.arange(2)[:, None, None, None] == 1, np.nan, np.zeros((2, 8, 8, 3))),
     r"images\[1\] has non-finite"),
    (np.zeros((2, 8, 8, 3), np.int32), "dtype int32 not supported"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], "mixed dtypes"),
    ("not images", "expected an array"),
])
def test_inception_features_rejects_bad_images(images, match):
  with pytest.raises(MedjaxError, match=match):
    fid.inception_features(NO_WEIGHTS, images, batch_size=8)


def test_bad_options():
  images = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(MedjaxError, match="resize='bicubic'"):
    fid.inception_features(NO_WEIGHTS, images, resize="bicubic")
  with pytest.raises(MedjaxError, match="batch_size=0"):
    fid.inception_features(NO_WEIGHTS, images, batch_size=0)
  with pytest.raises(MedjaxError, match="images_b has 1 image"):
    fid.compute_fid(images, images[:1], params=NO_WEIGHTS)


def _clean_fid_resize(x_uint8, size=299):
  """clean-fid's make_resizer('PIL', quantize_after=False, 'bicubic', (299, 299)), per image."""
  def resize_single_channel(x_np):
    img = Image.fromarray(x_np.astype(np.float32))
    img = img.resize((size, size), resample=Image.BICUBIC)
    return np.asarray(img).clip(0, 255).reshape(size, size, 1)
  return np.concatenate([resize_single_channel(x_uint8[:, :, i]) for i in range(3)], axis=2)


def test_clean_resize_is_clean_fid_resize():
  rng = np.random.default_rng(10)
  images = rng.random((2, 45, 70, 3)).astype(np.float32)
  out = fid.clean_resize(images)
  assert out.shape == (2, 299, 299, 3) and out.dtype == np.float32
  quantised = np.floor(images * 255 + 0.5).astype(np.uint8)
  for image, ours in zip(quantised, out):
    np.testing.assert_allclose(ours * 255, _clean_fid_resize(image), rtol=0, atol=1e-4)
  assert 0 <= out.min() and out.max() <= 1
  at_size = rng.random((1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_allclose(fid.clean_resize(at_size) * 255,
                             np.floor(at_size * 255 + 0.5), rtol=0, atol=1e-4)
