"""Reconstruction metrics (RMSE, PSNR, SSIM, MS-SSIM) in JAX on batched NHWC images.

Every function returns one value per image ([B]), so callers choose how to average. Images are
in [0, `data_range`] (default [0, 1]). The definitions follow the references used by the
papers medjax reproduces, and the tests check them against those references:

- `ssim`: scikit-image `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=..., channel_axis=-1)`: an 11-tap Gaussian window
  (truncate 3.5) and the mean of the SSIM map over the valid interior (a border of 5 pixels is
  cropped, so padding never enters the mean).
- `ms_ssim`: torchmetrics `multiscale_structural_similarity_index_measure` defaults: 5 scales,
  betas (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), `normalize='relu'`, 2x2 average pooling,
  contrast-structure at the first four scales (cropped mean) and full SSIM at the last one,
  whose mean torchmetrics takes over the whole reflect-padded map (not cropped).
  torchmetrics' single-scale SSIM is that uncropped variant: `ssim(..., crop=False)`.
"""
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import hosts
from medjax import sharding
from medjax.errors import MedjaxError

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(x, y, name: str) -> tuple[jax.Array, jax.Array]:
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape or x.ndim != 4:
    raise MedjaxError(f"{name}: images must be two NHWC arrays of one shape [B, H, W, C], got "
                      f"{tuple(x.shape)} and {tuple(y.shape)}")
  return x, y


def rmse(x, y) -> jax.Array:
  """Root mean squared error per image, over H, W and C: [B]."""
  x, y = _check_pair(x, y, "rmse")
  return _rmse_jit(x, y)


@jax.jit
def _rmse_jit(x, y):
  return jnp.sqrt(jnp.mean(jnp.square(x - y), axis=(1, 2, 3)))


def psnr(x, y, data_range: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image (as skimage `peak_signal_noise_ratio`): [B].

  Identical images give +inf, as in skimage.
  """
  x, y = _check_pair(x, y, "psnr")
  return _psnr_jit(x, y, float(data_range))


@jax.jit
def _psnr_jit(x, y, data_range):
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  """The normalised 1D Gaussian of scipy's `gaussian_filter` (radius int(truncate*sigma+0.5))."""
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return w / w.sum()


def _filter(x: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable 'valid' filtering over H and W as weighted sums of shifted slices.

  Plain multiply-adds in fp32 (no convolution), so GPUs do not switch to TF32 here.
  """
  k = len(window)
  h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
  x = sum(float(window[i]) * x[:, i:i + h] for i in range(k))
  return sum(float(window[i]) * x[:, :, i:i + w] for i in range(k))


def _ssim_maps(x, y, data_range, sigma, k1, k2, clamp_variance: bool):
  """SSIM and contrast-structure maps on reflect-padded images, each [B, H, W, C]."""
  window = gaussian_window(sigma)
  pad = (len(window) - 1) // 2
  if x.shape[1] <= pad or x.shape[2] <= pad:
    raise MedjaxError(f"ssim: images of {x.shape[1]}x{x.shape[2]} are too small for an "
                      f"{len(window)}-tap window")
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  x = jnp.pad(x, padding, mode="reflect")
  y = jnp.pad(y, padding, mode="reflect")
  mu_x, mu_y, xx, yy, xy = jnp.split(  # one filter pass over the five maps
      _filter(jnp.concatenate([x, y, x * x, y * y, x * y]), window), 5)
  var_x = xx - mu_x * mu_x
  var_y = yy - mu_y * mu_y
  cov = xy - mu_x * mu_y
  if clamp_variance:  # torchmetrics clamps; skimage does not
    var_x, var_y = jnp.maximum(var_x, 0.0), jnp.maximum(var_y, 0.0)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  cs = (2 * cov + c2) / (var_x + var_y + c2)
  ssim_map = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * cs
  return ssim_map, cs, pad


def _crop_mean(m: jax.Array, pad: int) -> jax.Array:
  return jnp.mean(m[:, pad:m.shape[1] - pad, pad:m.shape[2] - pad], axis=(1, 2, 3))


def ssim(x, y, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         crop: bool = True) -> jax.Array:
  """Gaussian-window SSIM per image: [B]; the mean over channels of per-channel SSIM.

  `crop=True` is skimage's definition (the mean over the interior at least `pad` pixels from
  the border); `crop=False` is torchmetrics' `structural_similarity_index_measure` (the mean
  over the whole map of reflect-padded images, variances clamped at 0).
  """
  x, y = _check_pair(x, y, "ssim")
  pad = (len(gaussian_window(sigma)) - 1) // 2
  if min(x.shape[1], x.shape[2]) < 2 * pad + 1:
    raise MedjaxError(f"ssim: images must be at least {2 * pad + 1} pixels on each side, got "
                      f"{x.shape[1]}x{x.shape[2]}")
  return _ssim_jit(x, y, float(data_range), float(sigma), float(k1), float(k2), bool(crop))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _ssim_jit(x, y, data_range, sigma, k1, k2, crop):
  ssim_map, _, pad = _ssim_maps(x, y, data_range, sigma, k1, k2, clamp_variance=not crop)
  if crop:
    return _crop_mean(ssim_map, pad)
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def _avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 average pooling, stride 2, odd edges dropped (torch `avg_pool2d(x, 2)`)."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def ms_ssim(x, y, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
            k2: float = 0.03, betas: Sequence[float] = MS_SSIM_BETAS,
            normalize: str | None = "relu") -> jax.Array:
  """Multi-scale SSIM per image as torchmetrics defines it (see the module docstring): [B].

  Needs H and W > 10 * 16 = 160 pixels for 5 scales (torchmetrics' own size check).
  """
  x, y = _check_pair(x, y, "ms_ssim")
  if normalize not in (None, "relu", "simple"):
    raise MedjaxError(f"ms_ssim: normalize must be None, 'relu' or 'simple', got {normalize!r}")
  window = len(gaussian_window(sigma))
  div = max(1, len(betas) - 1) ** 2
  for side in x.shape[1:3]:
    if side < 2 ** len(betas) or side // div <= window - 1:
      raise MedjaxError(f"ms_ssim: with {len(betas)} scales images must be larger than "
                        f"{(window - 1) * div} pixels on each side, got {x.shape[1]}x{x.shape[2]}")
  return _ms_ssim_jit(x, y, float(data_range), float(sigma), float(k1), float(k2),
                      tuple(float(b) for b in betas), normalize)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _ms_ssim_jit(x, y, data_range, sigma, k1, k2, betas, normalize):
  values = []
  for i in range(len(betas)):
    ssim_map, cs_map, pad = _ssim_maps(x, y, data_range, sigma, k1, k2, clamp_variance=True)
    if i < len(betas) - 1:
      values.append(_crop_mean(cs_map, pad))
      x, y = _avg_pool2(x), _avg_pool2(y)
    else:
      values.append(jnp.mean(ssim_map, axis=(1, 2, 3)))
  v = jnp.stack(values)  # [scales, B]
  if normalize == "relu":
    v = jax.nn.relu(v)
  elif normalize == "simple":
    v = (v + 1) / 2
  return jnp.prod(v ** jnp.asarray(betas, jnp.float32)[:, None], axis=0)


def reconstruction_metrics(x, y, data_range: float = 1.0, with_ms_ssim: bool | None = None
                           ) -> dict[str, jax.Array]:
  """{'rmse', 'psnr', 'ssim'[, 'ms_ssim']} per image; MS-SSIM when the images are big enough."""
  x, y = _check_pair(x, y, "reconstruction_metrics")
  out = {"rmse": rmse(x, y), "psnr": psnr(x, y, data_range), "ssim": ssim(x, y, data_range)}
  if with_ms_ssim is None:
    with_ms_ssim = min(x.shape[1], x.shape[2]) > 160
  if with_ms_ssim:
    out["ms_ssim"] = ms_ssim(x, y, data_range)
  return out


def vae_roundtrip_metrics(sd, images, batch_size: int = 8, mesh=None) -> dict[str, float]:
  """Mean reconstruction metrics of `sd`'s VAE (encode posterior mean -> decode) per image.

  `images`: NHWC in [0, 1] (H, W multiples of the VAE factor). They go to the VAE as
  2x-1 in [-1, 1]; the decoded [-1, 1] output is mapped back and clipped to [0, 1] before the
  metrics (data range 1). Returns {'rmse', 'psnr', 'ssim'[, 'ms_ssim'], 'num_images'}; the
  means are over images (PSNR averaged in dB; an exact reconstruction would be +inf).
  `mesh`: see `vae_roundtrip`.
  """
  return vae_roundtrip(sd, images, batch_size, mesh)[0]


def vae_roundtrip(sd, images, batch_size: int = 8, mesh=None,
                  sink: Callable[[np.ndarray], None] | None = None
                  ) -> tuple[dict, np.ndarray | None]:
  """(`vae_roundtrip_metrics`, the decoded images NHWC in [-1, 1], unclipped, on the host).

  With `mesh` (`medjax.sharding.make_mesh`), each batch is split over its data axes (padded to a
  multiple of the data-parallel size); the mesh may span several processes, which then all make
  the same call and all get the same results. `images` may also be an on-disk
  `image_store.ImageStore` (uint8 / 255, read batch by batch); with `sink`, each decoded batch
  goes to `sink(batch)` instead of being kept (None is returned for them), so memory does not
  grow with the number of images.
  """
  on_disk = hasattr(images, "read_range")
  if not on_disk:
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise MedjaxError(f"vae_roundtrip_metrics: images must be NHWC, got shape {images.shape}")
    if images.size and (images.min() < 0 or images.max() > 1):
      raise MedjaxError("vae_roundtrip_metrics: images must be in [0, 1], got values in "
                        f"[{images.min():.3g}, {images.max():.3g}]")
  n = len(images)
  if n == 0:
    raise MedjaxError("vae_roundtrip_metrics: no images")
  sums: dict[str, float] = {}
  decoded = []
  for start in range(0, n, batch_size):
    if on_disk:
      batch = images.read_range(start, start + batch_size).astype(np.float32) / np.float32(255)
    else:
      batch = images[start:start + batch_size]
    count = batch.shape[0]
    size = batch_size if n > batch_size else count  # pad the last batch: one compiled shape
    if mesh is not None:
      per = sharding.data_parallel_size(mesh)
      size = -(-size // per) * per
    if count < size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], size - count, 0)])
    if mesh is not None:
      batch = hosts.to_global(batch, sharding.batch_sharding(mesh))
    out = sd.decode_latents(sd.encode_images(jnp.asarray(batch) * 2.0 - 1.0))
    host = hosts.to_host(out)[:count]
    if sink is None:
      decoded.append(host)
    else:
      sink(host)
    recon = jnp.clip((out + 1.0) / 2.0, 0.0, 1.0)
    values = hosts.to_host(reconstruction_metrics(batch, recon, data_range=1.0))
    for key, v in values.items():
      sums[key] = sums.get(key, 0.0) + float(np.sum(np.asarray(v, np.float64)[:count]))
  metrics = {k: v / n for k, v in sums.items()}
  metrics["num_images"] = n
  return metrics, (np.concatenate(decoded) if sink is None else None)


__all__ = [
  "MS_SSIM_BETAS",
  "gaussian_window",
  "ms_ssim",
  "psnr",
  "reconstruction_metrics",
  "rmse",
  "ssim",
  "vae_roundtrip",
  "vae_roundtrip_metrics",
]
