"""Reconstruction metrics vs scikit-image (SSIM, PSNR) and torchmetrics (MS-SSIM, SSIM)."""
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional import image as tm_image

from medjax import StableDiffusion
from medjax.errors import MedjaxError
from medjax.eval import recon

SSIM_ATOL = 1e-4   # fp32 JAX vs fp64 references
PSNR_ATOL = 1e-3   # dB


def _pair(kind, shape, seed=0, data_range=1.0):
  rng = np.random.default_rng(seed)
  if kind == "random":
    x = rng.random(shape)
  else:  # smooth: low-frequency blobs, where SSIM is sensitive to the window
    b, h, w, c = shape
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    x = np.stack([np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.random() * 3 * yy + rng.random()
                                                              * 2 * xx) + rng.random() * 6)
                            for _ in range(c)], -1) for _ in range(b)])
  y = np.clip(x + 0.08 * rng.standard_normal(shape) + 0.03, 0, 1)
  return (x * data_range).astype(np.float32), (y * data_range).astype(np.float32)


def _torch(a):
  return torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind,shape,data_range", [
    ("random", (2, 48, 40, 3), 1.0), ("smooth", (2, 64, 64, 1), 1.0),
    ("smooth", (2, 33, 47, 3), 255.0)])
def test_ssim_psnr_rmse_match_skimage(kind, shape, data_range):
  x, y = _pair(kind, shape, data_range=data_range)
  got_ssim = np.asarray(recon.ssim(x, y, data_range=data_range))
  got_psnr = np.asarray(recon.psnr(x, y, data_range=data_range))
  got_rmse = np.asarray(recon.rmse(x, y))
  for i in range(shape[0]):
    a, b = x[i].astype(np.float64), y[i].astype(np.float64)
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=data_range,
                                channel_axis=-1)
    assert abs(got_ssim[i] - ref) <= SSIM_ATOL, (got_ssim[i], ref)
    assert abs(got_psnr[i] - peak_signal_noise_ratio(a, b, data_range=data_range)) <= PSNR_ATOL
    np.testing.assert_allclose(got_rmse[i], np.sqrt(np.mean((a - b) ** 2)), rtol=1e-5)


@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_ms_ssim_and_uncropped_ssim_match_torchmetrics(kind):
  x, y = _pair(kind, (2, 176, 192, 3), seed=1)
  ref = tm_image.multiscale_structural_similarity_index_measure(
      _torch(x), _torch(y), data_range=1.0, reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(recon.ms_ssim(x, y)), ref, atol=SSIM_ATOL, rtol=0)
  ref = tm_image.structural_similarity_index_measure(_torch(x), _torch(y), data_range=1.0,
                                                     reduction="none").numpy()
  np.testing.assert_allclose(np.asarray(recon.ssim(x, y, crop=False)), ref, atol=SSIM_ATOL,
                             rtol=0)


def test_identical_images_and_bad_input():
  x, _ = _pair("random", (1, 32, 32, 1))
  assert float(recon.ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
  assert np.isinf(float(recon.psnr(x, x)[0]))
  with pytest.raises(MedjaxError, match="one shape"):
    recon.ssim(x, x[:, :16])
  with pytest.raises(MedjaxError, match="larger than 160"):
    recon.ms_ssim(x, x)


def test_vae_roundtrip_metrics_on_embedded_model():
  sd = StableDiffusion.embedded(seed=0)
  images = _pair("smooth", (3, 32, 32, 3))[0]
  got = recon.vae_roundtrip_metrics(sd, images, batch_size=2)
  assert got["num_images"] == 3 and set(got) == {"rmse", "psnr", "ssim", "num_images"}
  # Same numbers by hand, in the same two batches of 2 (the last padded): padding must not
  # change the per-image metrics.
  padded = np.concatenate([images, images[-1:]])
  per_image = {"rmse": [], "ssim": []}
  for batch in (padded[:2], padded[2:]):
    out = np.clip((np.asarray(sd.decode_latents(sd.encode_images(batch * 2 - 1))) + 1) / 2, 0, 1)
    for key, fn in (("rmse", recon.rmse), ("ssim", recon.ssim)):
      per_image[key].extend(np.asarray(fn(batch, out)).tolist())
  for key, values in per_image.items():
    assert got[key] == pytest.approx(float(np.mean(values[:3])), abs=1e-6)
  with pytest.raises(MedjaxError, match=r"\[0, 1\]"):
    recon.vae_roundtrip_metrics(sd, images * 2 - 1)
