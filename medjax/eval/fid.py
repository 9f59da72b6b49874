"""FID and KID with pytorch-fid's Inception, matching pytorch-fid / torchmetrics / clean-fid.

* `inception_features`: images -> [N, 2048] pool features (jitted once per batch shape);
  `inception_statistics`: their (mu, sigma) merged batch by batch, in O(D^2) memory.
* `statistics` + `frechet_distance`: pytorch-fid's `calculate_activation_statistics` and
  `calculate_frechet_distance` (float64 NumPy, scipy's sqrtm, eps offset when singular).
* `kid`: the unbiased polynomial-kernel MMD of torchmetrics' KernelInceptionDistance and
  clean-fid (degree 3, gamma 1/d, coef 1), mean and std over seeded random subsets.
* `compute_fid`: images to one number.

Images are NHWC float in [0, 1] (uint8 is divided by 255, as torchvision's ToTensor does), as
one array [N, H, W, C], an on-disk `image_store.ImageStore` (uint8, read batch by batch) or a
sequence of [H, W, C] / [H, W] arrays of one size; C is 1
(grayscale, repeated to RGB) or 3. `resize='pytorch-fid'` resizes inside the network
(bilinear, as pytorch-fid); `resize='clean'` first quantises to uint8 and resizes each channel
with PIL's bicubic filter on the host, as clean-fid does (the network is still pytorch-fid's).
"""
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image
from scipy import linalg

from medjax import hosts
from medjax import sharding
from medjax.errors import MedjaxError
from medjax.eval import inception_weights
from medjax.eval.inception import FEATURE_DIM
from medjax.eval.inception import INPUT_SIZE
from medjax.eval.inception import InceptionV3

RESIZE_MODES = ("pytorch-fid", "clean")


@functools.partial(jax.jit, static_argnums=0)
def _forward(module: InceptionV3, variables, images):
  return module.apply(variables, images)


def _num_images(images) -> int:
  if isinstance(images, (np.ndarray, jax.Array)):
    if images.ndim != 4:
      raise MedjaxError(f"images: expected an array [N, H, W, C], got shape {images.shape}")
    return images.shape[0]
  if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
    raise MedjaxError(f"images: expected an array [N, H, W, C] or a sequence of [H, W, C] "
                      f"arrays, got {type(images).__name__}")
  return len(images)


def _to_unit_float(batch: np.ndarray, first: int) -> np.ndarray:
  """uint8 -> /255; floats checked finite and in [0, 1]. Never lets NaN through."""
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / np.float32(255)
  if batch.dtype.kind != "f":
    raise MedjaxError(f"images: dtype {batch.dtype} not supported; pass float in [0, 1] or uint8")
  batch = batch.astype(np.float32)
  if not np.isfinite(batch).all():
    bad = first + int(np.argwhere(~np.isfinite(batch).reshape(len(batch), -1).all(1))[0, 0])
    raise MedjaxError(f"images[{bad}] has non-finite values (NaN or inf)")
  lo, hi = float(batch.min()), float(batch.max())
  if lo < 0 or hi > 1:
    raise MedjaxError(f"images[{first}:{first + len(batch)}]: values in [{lo:.4g}, {hi:.4g}], "
                      "expected [0, 1] (map [-1, 1] outputs with (x + 1) / 2)")
  return batch


def _load_batch(images, start: int, stop: int, shape: list) -> np.ndarray:
  """images[start:stop] as float32 NHWC in [0, 1]; `shape` holds the first shape and dtype."""
  if isinstance(images, (np.ndarray, jax.Array)):
    batch = np.asarray(images[start:stop])
    items = [(start, batch.shape[1:])]
  elif hasattr(images, "read_range"):  # an on-disk `image_store.ImageStore`: uint8 rows
    batch = images.read_range(start, stop)
    items = [(start, batch.shape[1:])]
  else:
    arrays = []
    for i in range(start, stop):
      a = np.asarray(images[i])
      if a.ndim == 2:
        a = a[..., None]
      if a.ndim != 3:
        raise MedjaxError(f"images[{i}]: expected [H, W, C] or [H, W], got shape {a.shape}")
      arrays.append(a)
    items = [(start + j, a.shape) for j, a in enumerate(arrays)]
  for i, s in items:
    if s[-1] not in (1, 3):
      raise MedjaxError(f"images[{i}]: {s[-1]} channels, expected 1 (grayscale) or 3 (RGB)")
    if not shape:
      shape.append(tuple(s))
    elif tuple(s) != shape[0]:
      raise MedjaxError(f"images[{i}] has shape {tuple(s)} but images[0] has {shape[0]}: "
                        "all images must have one size and channel count (resize them first)")
  if not isinstance(images, (np.ndarray, jax.Array)) and not hasattr(images, "read_range"):
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
      raise MedjaxError(f"images[{start}:{stop}]: mixed dtypes {sorted(map(str, dtypes))}")
    batch = np.stack(arrays)
  if len(shape) == 1:
    shape.append(batch.dtype)
  elif (batch.dtype == np.uint8) != (shape[1] == np.uint8):  # 0..255 vs 0..1 would mix
    raise MedjaxError(f"images[{start}:{stop}] are {batch.dtype} but images[0] is {shape[1]}")
  return _to_unit_float(batch, start)


def clean_resize(batch: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """clean-fid's resize: uint8 quantisation, then PIL bicubic per channel in float ('F') mode.

  `batch` is float NHWC in [0, 1]; quantised as torchvision's save_image (floor(255 x + 0.5)).
  Returns float32 NHWC in [0, 1] at size x size.
  """
  quantised = np.floor(batch * 255 + 0.5).clip(0, 255).astype(np.uint8).astype(np.float32)
  out = np.empty((len(batch), size, size, batch.shape[-1]), np.float32)
  for n, image in enumerate(quantised):
    for c in range(image.shape[-1]):
      channel = Image.fromarray(np.ascontiguousarray(image[..., c]))  # mode 'F'
      resized = channel.resize((size, size), resample=Image.Resampling.BICUBIC)
      out[n, ..., c] = np.asarray(resized).clip(0, 255)
  return out / np.float32(255)


def inception_features(params, images, batch_size: int = 50, mesh: jax.sharding.Mesh | None = None,
                       resize: str = "pytorch-fid") -> np.ndarray:
  """Images -> pytorch-fid's 2048-d pool features, float32 [N, 2048].

  `params`: the variables dict (`{'params', 'batch_stats'}`) from `load_inception` or
  `random_inception`. Batches of min(batch_size, N) images (the last one zero-padded), so one
  compile per image size. With `mesh`, each batch is split over its data axes (`data`, `fsdp`)
  and params replicated; the batch is rounded up to a multiple of the data-parallel size. A mesh
  over several processes needs the same call on every process (each feeds its devices' rows);
  all of them get all N features.
  """
  return np.concatenate(list(_feature_batches(params, images, batch_size, mesh, resize)))


def inception_statistics(params, images, batch_size: int = 50,
                         mesh: jax.sharding.Mesh | None = None, resize: str = "pytorch-fid",
                         dims: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`statistics(inception_features(...)[:, :dims])` without holding the [N, D] features.

  Batch means and centred scatter matrices are merged in float64 as they come (Chan et al.'s
  pairwise update), so memory is O(D^2) whatever N; equal to `statistics` to rounding.
  `images` may be an `image_store.ImageStore` (read batch by batch from disk).
  """
  n, mean, scatter, scratch = 0, None, None, None
  for f in _feature_batches(params, images, batch_size, mesh, resize):
    f = np.asarray(f[:, :dims] if dims else f, np.float64)
    if not np.isfinite(f).all():
      raise MedjaxError("features: non-finite values (NaN or inf)")
    b, mb = len(f), f.mean(axis=0)
    f -= mb
    if mean is None:  # two D x D buffers, reused for every batch
      n, mean, scatter = b, mb, f.T @ f
      scratch = np.empty_like(scatter)
      continue
    np.matmul(f.T, f, out=scratch)
    scatter += scratch
    delta = mb - mean
    total = n + b
    np.outer(delta, delta * (n * b / total), out=scratch)
    scatter += scratch
    mean = mean + delta * (b / total)
    n = total
  if n < 2:
    raise MedjaxError(f"features: {n} sample(s); FID statistics need at least 2 "
                      "(and many more than the 2048 dims for a full-rank covariance)")
  del scratch
  scatter /= n - 1
  return mean, scatter


def _feature_batches(params, images, batch_size: int, mesh, resize: str):
  """[b, 2048] float32 features per batch of `images`, in order (see `inception_features`)."""
  if resize not in RESIZE_MODES:
    raise MedjaxError(f"resize={resize!r}: expected one of {RESIZE_MODES}")
  n = _num_images(images)
  if n == 0:
    raise MedjaxError("images: empty")
  if batch_size < 1:
    raise MedjaxError(f"batch_size={batch_size}: must be >= 1")
  bs = min(batch_size, n)
  batch_sharding = None
  if mesh is None:
    params = jax.device_put(params)  # once, not with every batch (NumPy trees)
  else:
    if not set(sharding.BATCH_AXES) <= set(mesh.axis_names):
      raise MedjaxError(f"mesh axes {mesh.axis_names}: expected {sharding.BATCH_AXES} "
                        "(medjax.sharding.make_mesh)")
    per = sharding.data_parallel_size(mesh)
    bs = -(-bs // per) * per
    batch_sharding = sharding.batch_sharding(mesh)
    params = hosts.to_global(params, sharding.replicated(mesh))
  module = InceptionV3()
  shape = []
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    batch = _load_batch(images, start, stop, shape)
    if resize == "clean":
      batch = clean_resize(batch)
    if batch.shape[-1] == 1:  # on the host, so gray and RGB share one compiled network
      batch = np.repeat(batch, 3, axis=-1)
    if stop - start < bs:
      batch = np.concatenate([batch, np.zeros((bs - (stop - start),) + batch.shape[1:],
                                              batch.dtype)])
    x = hosts.to_global(batch, batch_sharding) if batch_sharding is not None else batch
    yield hosts.to_host(_forward(module, params, x))[:stop - start]


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of [N, D] features in float64, as pytorch-fid (np.cov(rowvar=False))."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise MedjaxError(f"features: expected [N, D], got shape {f.shape}")
  if f.shape[0] < 2:
    raise MedjaxError(f"features: {f.shape[0]} sample(s); FID statistics need at least 2 "
                      "(and many more than the 2048 dims for a full-rank covariance)")
  if not np.isfinite(f).all():
    raise MedjaxError("features: non-finite values (NaN or inf)")
  return np.mean(f, axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """pytorch-fid's `calculate_frechet_distance` (Dougal Sutherland's stable version).

  d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)). When the product is
  singular (sqrtm not finite), `eps` is added to both diagonals, with a warning; an imaginary
  part of sqrtm above 1e-3 on the diagonal is an error, a smaller one is dropped.
  """
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape:
    raise MedjaxError(f"frechet_distance: mean vectors have different shapes {mu1.shape}, "
                      f"{mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise MedjaxError(f"frechet_distance: covariances {sigma1.shape}, {sigma2.shape} do not "
                      f"match the means {mu1.shape}")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(a).all():
      raise MedjaxError(f"frechet_distance: {name} has non-finite values")
  diff = mu1 - mu2
  # Product might be almost singular.
  covmean = linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of "
                  "cov estimates", RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  # Numerical error might give a slight imaginary component.
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise MedjaxError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} "
                        "in sqrtm(sigma1 sigma2)")
    covmean = covmean.real
  value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
  if not np.isfinite(value):
    raise MedjaxError("frechet_distance: result is not finite")
  return value


def _poly_mmd(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
  """Unbiased MMD^2 with k(a, b) = (gamma a.b + coef)^degree (torchmetrics' poly_mmd)."""
  m = x.shape[0]
  k_xx = (x @ x.T * gamma + coef) ** degree
  k_yy = (y @ y.T * gamma + coef) ** degree
  k_xy = (x @ y.T * gamma + coef) ** degree
  value = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1))
  return float(value - 2 * k_xy.sum() / m ** 2)


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

  Each of `subsets` draws `subset_size` rows of each set without replacement (NumPy, seeded);
  `subset_size` is capped at the smaller set, as clean-fid does (torchmetrics raises instead).
  gamma None is 1 / D. The std is over subsets with ddof=0, as torchmetrics.
  """
  fa, fb = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  for name, f in (("features_a", fa), ("features_b", fb)):
    if f.ndim != 2:
      raise MedjaxError(f"kid: {name} expected [N, D], got shape {f.shape}")
    if not np.isfinite(f).all():
      raise MedjaxError(f"kid: {name} has non-finite values")
  if fa.shape[1] != fb.shape[1]:
    raise MedjaxError(f"kid: feature dims differ ({fa.shape[1]} vs {fb.shape[1]})")
  m = min(subset_size, fa.shape[0], fb.shape[0])
  if m < 2:
    raise MedjaxError(f"kid: subsets of {m} sample(s); KID needs at least 2 per set")
  if subsets < 1:
    raise MedjaxError(f"kid: subsets={subsets}, must be >= 1")
  gamma = 1.0 / fa.shape[1] if gamma is None else gamma
  rng = np.random.default_rng(seed)
  scores = np.array([
      _poly_mmd(fa[rng.choice(fa.shape[0], m, replace=False)],
                fb[rng.choice(fb.shape[0], m, replace=False)], degree, gamma, coef)
      for _ in range(subsets)])
  return float(scores.mean()), float(scores.std())


def compute_fid(images_a, images_b, params: Any = None, batch_size: int = 50,
                mesh: jax.sharding.Mesh | None = None, resize: str = "pytorch-fid",
                allow_pickle: bool = False) -> float:
  """FID between two image sets (see the module docstring for the image format).

  `params` None loads pytorch-fid's weights with `medjax.eval.inception_weights.load_inception`
  ($MEDJAX_INCEPTION_WEIGHTS or torch hub's cache; a `.pth` needs `allow_pickle=True`).
  Each set needs at least 2 images; FID is biased (and its covariance singular) far below
  2048 images, so compare numbers only at equal set sizes.
  """
  if params is None:
    params = inception_weights.load_inception(allow_pickle=allow_pickle)
  for name, images in (("images_a", images_a), ("images_b", images_b)):
    if _num_images(images) < 2:
      raise MedjaxError(f"compute_fid: {name} has {_num_images(images)} image(s), need >= 2")
  stats = [statistics(inception_features(params, images, batch_size, mesh, resize))
           for images in (images_a, images_b)]
  return frechet_distance(*stats[0], *stats[1])


__all__ = ["FEATURE_DIM", "RESIZE_MODES", "clean_resize", "compute_fid", "frechet_distance",
           "inception_features", "inception_statistics", "kid", "statistics"]
