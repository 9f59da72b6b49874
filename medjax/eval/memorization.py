"""Privacy audit: is any generated image a near-copy of a training patient's image?

For every generated image, its nearest training images, in three steps:
1. Features (Inception pool features, `inception_feature_fn`, or any `images -> [B, D]`
   function, e.g. a classifier's penultimate layer), L2-normalised. The distance is the L2
   distance between unit vectors, sqrt(2 - 2 cos) in [0, 2]: it orders pairs as cosine does and
   is a metric. Each image is also searched mirrored (`flip`): features are not flip-invariant,
   and a mirrored copy must still reach step 2. Exact search: a jitted block matmul of the
   queries against fixed-size blocks of training features, keeping a running top-k (queries
   optionally sharded over a mesh's batch axes); training features stream in batches and are
   never all kept, and no [queries x training] matrix exists beyond one block.
2. Pixel SSIM (`medjax.eval.recon.ssim`, scikit-image's) of the `top_k` feature candidates,
   re-read with `fetch(keys)`, maximised over an alignment search: integer shifts of up to
   `max_shift` pixels each way, with and without a horizontal flip, on the central
   (H - 2 max_shift) x (W - 2 max_shift) window of the training image.
3. Calibration on real held-out images (never trained on), searched the same way. A generated
   image is flagged when its nearest-neighbour distance is strictly below the held-out
   distances' lower `percentile * (1 - ssim_share)` percent tail, or its best aligned SSIM
   strictly above the held-out SSIMs' upper `percentile * ssim_share` percent tail: the
   false-positive budget `percentile` is split between the two rules (Bonferroni), each tail
   taken conservatively (`threshold`: split-conformal order statistics). A fresh image
   exchangeable with the held-out ones is then flagged with probability at most
   `false_positive_bound` (the two tails' j / (n + 1)), which is at most `percentile` percent
   given n >= 100 / (the smaller tail) - 1 held-out images (199 for the default 1%, split in
   halves); `heldout_flag_rate` is the rule's rate on the held-out images themselves.

Inputs are iterables of (images [B, H, W, 3] in [-1, 1], keys [B]) batches, so callers can feed
arrays (`array_batches`) or on-disk stores; the generated and held-out batches are read twice
(features, then SSIM), so pass a list, a re-iterable object or a function returning a fresh
iterable. Results name images by record key only (never a patient identifier).
"""
import dataclasses
import functools
import heapq
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import hosts
from medjax import sharding
from medjax.errors import MedjaxError
from medjax.eval import fid as fid_lib
from medjax.eval import recon

FeatureFn = Callable[[np.ndarray], np.ndarray]


def default_config() -> ml_collections.ConfigDict:
  """`config.privacy` of an evaluation config (the audit step of every protocol)."""
  c = ml_collections.ConfigDict()
  # Paper A / B protocols: audit the generated images after generation (protocol 'privacy'
  # always does).
  c.enabled = True
  c.features = "inception"  # or 'pixels' (mean-centred downsampled grey pixels)
  c.top_k = 5  # feature candidates per image re-read for pixel SSIM
  # False-positive budget (percent): an image like the held-out ones is flagged with at most
  # this probability (given 100 / (its smaller half) held-out images); `ssim_share` of it goes
  # to the SSIM rule (held-out upper tail), the rest to the feature distance rule (lower tail).
  c.percentile = 1.0
  c.ssim_share = 0.5  # 0: the distance rule alone; 1: the SSIM rule alone
  c.max_shift = 2  # alignment search: integer shifts of +- this many pixels
  c.flip = True  # also search horizontally mirrored images
  c.block_size = 4096  # training features per search block
  c.batch_size = 16  # images per feature / SSIM batch
  c.heldout_split = "test"  # the calibration: real images never trained on ('val' or 'test')
  # Calibrate on the held-out images passed through the generator's VAE: its decoder smooths
  # every generated image, which raises their SSIM to the (noisy) training images. Measured on the
  # embedded model: raw held-out calibration flagged 29% (CXR) / 100% (MRI) of the VAE round
  # trips of held-out images, never trained on, as often as its generations (README, privacy).
  c.heldout_through_vae = True
  # The audit's power: the fraction flagged of the VAE round trips of this many training images
  # (near-copies a generator that memorised its latents would output); 0: off (README, privacy).
  c.power_probes = 100
  c.gallery = 16  # closest pairs drawn side by side
  # Feature queries: training images' central windows (margin max |offset|) are matched by each
  # image's windows moved by these offsets in y and x (and mirrored with `flip`), so a shifted
  # copy's source is among its candidates: (-2, 0, 2) -> 9 (18 with flip) queries per image.
  c.query_shifts = (-2, 0, 2)
  return c


@dataclasses.dataclass(frozen=True)
class Options:
  top_k: int = 5
  percentile: float = 1.0
  ssim_share: float = 0.5
  max_shift: int = 2
  flip: bool = True
  block_size: int = 4096
  batch_size: int = 16
  gallery: int = 16
  query_shifts: tuple[int, ...] = (-2, 0, 2)

  @classmethod
  def from_config(cls, c) -> "Options":
    kw = {f.name: c[f.name] for f in dataclasses.fields(cls)}
    return cls(**{**kw, "query_shifts": tuple(kw["query_shifts"])})

  def check(self) -> None:
    for name in ("top_k", "block_size", "batch_size"):
      if isinstance(getattr(self, name), bool) or int(getattr(self, name)) < 1:
        raise MedjaxError(f"privacy.{name}={getattr(self, name)!r}: expected an integer >= 1")
    if not 0 < float(self.percentile) <= 100:
      raise MedjaxError(f"privacy.percentile={self.percentile!r}: expected a percent in (0, 100]")
    if not 0 <= float(self.ssim_share) <= 1:
      raise MedjaxError(f"privacy.ssim_share={self.ssim_share!r}: expected 0..1")
    if any(abs(int(s)) > self.max_shift for s in self.query_shifts):
      raise MedjaxError(f"privacy.query_shifts={self.query_shifts}: each within +-max_shift="
                        f"{self.max_shift}")
    if self.max_shift < 0 or self.gallery < 0:
      raise MedjaxError("privacy.max_shift and privacy.gallery must be >= 0")


# -- features ------------------------------------------------------------------------------------

def inception_feature_fn(params, batch_size: int = 16, mesh=None, resize: str = "pytorch-fid",
                         dims: int = 0) -> FeatureFn:
  """[-1, 1] images -> Inception pool features (the first `dims`; 0 = all 2048).

  Inputs are padded to a multiple of `batch_size`, so ragged stream batches compile once.
  """
  def fn(images):
    images = np.asarray(images, np.float32)
    n = len(images)
    pad = -n % batch_size
    x = np.concatenate([images, np.repeat(images[-1:], pad, 0)]) if pad else images
    f = fid_lib.inception_features(params, np.clip((x + 1) / 2, 0, 1), batch_size=batch_size,
                                   mesh=mesh, resize=resize)[:n]
    return f[:, :dims] if dims else f
  return fn


def pixel_feature_fn(size: int = 16) -> FeatureFn:
  """[-1, 1] images -> grey pixels downsampled to size x size, mean-centred: a cheap baseline."""
  def fn(images):
    grey = jnp.asarray(images, jnp.float32).mean(-1)
    small = jax.image.resize(grey, (grey.shape[0], size, size), "linear", antialias=True)
    small = small.reshape(len(grey), -1)
    return np.asarray(small - small.mean(1, keepdims=True))
  return fn


def _iterate(source, name: str):
  if not callable(source) and iter(source) is source and name != "train":
    raise MedjaxError(f"{name}: a one-shot iterator is read twice (features, then SSIM); pass "
                      "a list, a re-iterable object or a function returning fresh batches")
  for images, keys in source() if callable(source) else source:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(keys) != len(images):
      raise MedjaxError(f"{name}: expected batches of (images [B, H, W, 3], B keys), got "
                        f"{images.shape} with {len(keys)} keys")
    if not np.isfinite(images).all() or images.min() < -1 or images.max() > 1:
      raise MedjaxError(f"{name}: images must be finite and in [-1, 1]")
    yield images.astype(np.float32), [str(k) for k in keys]


def _normalise(f: np.ndarray) -> np.ndarray:
  f = np.asarray(f, np.float32)
  norm = np.linalg.norm(f, axis=1, keepdims=True)
  if not np.isfinite(f).all() or (norm == 0).any():
    raise MedjaxError("features: non-finite or all-zero feature vectors (a constant image with "
                      "mean-centred features?); use another feature function")
  return f / norm


def _crop(images: np.ndarray, flipped: bool, dy: int, dx: int, m: int) -> np.ndarray:
  """The window images[m + dy : H - m + dy, m + dx : W - m + dx] (of the mirrored images when
  `flipped`): for a copy shifted by (dy, dx), it is the source's central window."""
  images = images[:, :, ::-1] if flipped else images
  h, w = images.shape[1:3]
  return images[:, m + dy:h - m + dy, m + dx:w - m + dx]


def _query_variants(opt: "Options") -> list[tuple[bool, int, int]]:
  offsets = sorted(set(opt.query_shifts) | {0})
  return [(f, dy, dx) for f in ((False, True) if opt.flip else (False,))
          for dy in offsets for dx in offsets]


def _features(source, feature_fn: FeatureFn, variants, m: int, name: str):
  """(unit features [V * N, D] of each variant's window (`_crop`), variant-major; keys [N])."""
  feats, keys = [[] for _ in variants], []
  for images, k in _iterate(source, name):
    for v, (flipped, dy, dx) in enumerate(variants):
      feats[v].append(_normalise(feature_fn(_crop(images, flipped, dy, dx, m))))
    keys += k
  if not keys:
    raise MedjaxError(f"{name}: no images")
  return np.concatenate([f for per in feats for f in per]), keys


# -- exact block nearest-neighbour search --------------------------------------------------------

@functools.partial(jax.jit, static_argnames="k")
def _merge_block(queries, block, valid, best_s, best_i, offset, k):
  s = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)
  s = jnp.where(valid[None, :], s, -jnp.inf)
  idx = jnp.broadcast_to(offset + jnp.arange(block.shape[0], dtype=jnp.int32), s.shape)
  top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], 1), k)
  return top_s, jnp.take_along_axis(jnp.concatenate([best_i, idx], 1), pos, 1)


def nearest(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int, block_size: int = 4096,
            mesh: jax.sharding.Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest reference rows of each unit-norm query: (distances [Q, k], indices [Q, k]).

  `blocks` yields unit-norm reference features [b, D] of any b; they are regrouped into
  `block_size` rows (the last padded and masked), so the search compiles once. Indices count
  rows over all blocks; distances are sqrt(2 - 2 q.r), ascending (ties: the lower index).
  With `mesh`, the queries are sharded over its batch axes and each block replicated.
  """
  queries = np.asarray(queries, np.float32)
  n, dim = queries.shape
  rows = n if mesh is None else -(-n // sharding.data_parallel_size(mesh)) * \
      sharding.data_parallel_size(mesh)
  q = np.zeros((rows, dim), np.float32)
  q[:n] = queries
  best_s = np.full((rows, k), -np.inf, np.float32)
  best_i = np.full((rows, k), -1, np.int32)
  place = (lambda x, _: x) if mesh is None else (
      lambda x, rows_sharded: hosts.to_global(x, sharding.batch_sharding(mesh) if rows_sharded
                                              else sharding.replicated(mesh)))
  q, best_s, best_i = (place(x, True) for x in (q, best_s, best_i))
  total, buf = 0, []

  def flush(parts):
    nonlocal best_s, best_i, total
    block = np.concatenate(parts)
    valid = np.arange(block_size) < len(block)
    block = np.concatenate([block, np.zeros((block_size - len(block), dim), np.float32)])
    best_s, best_i = _merge_block(q, place(block, False), place(valid, False), best_s, best_i,
                                  np.int32(total), k)
    total += int(valid.sum())

  held = 0
  for b in blocks:
    b = np.asarray(b, np.float32)
    if b.ndim != 2 or b.shape[1] != dim:
      raise MedjaxError(f"nearest: reference block of shape {b.shape}, expected [b, {dim}]")
    while len(b):
      take = min(block_size - held, len(b))
      buf.append(b[:take])
      held, b = held + take, b[take:]
      if held == block_size:
        flush(buf)
        buf, held = [], 0
  if buf:
    flush(buf)
  if total < k:
    raise MedjaxError(f"nearest: {total} reference rows, fewer than top_k={k}")
  s, i = hosts.to_host((best_s, best_i))
  return np.sqrt(np.maximum(0.0, 2.0 - 2.0 * s[:n].astype(np.float64))), i[:n].astype(np.int64)


def _merge_variants(dist, idx, n: int, k: int):
  """Rows of V variants of n images (variant-major): per image, the k best distinct training
  indices over all its variants (ties: the lower index)."""
  v = len(dist) // n
  if v == 1:
    return dist, idx
  d = dist.reshape(v, n, k).transpose(1, 0, 2).reshape(n, v * k)
  i = idx.reshape(v, n, k).transpose(1, 0, 2).reshape(n, v * k)
  out_d, out_i = np.empty((n, k)), np.empty((n, k), np.int64)
  for r in range(n):
    order = np.lexsort((i[r], d[r]))
    _, first = np.unique(i[r][order], return_index=True)
    keep = order[np.sort(first)][:k]
    out_d[r], out_i[r] = d[r][keep], i[r][keep]
  return out_d, out_i


# -- aligned pixel SSIM --------------------------------------------------------------------------

def _variants(max_shift: int, flip: bool) -> list[tuple[bool, int, int]]:
  r = range(-max_shift, max_shift + 1)
  return [(f, dy, dx) for f in ((False, True) if flip else (False,)) for dy in r for dx in r]


def aligned_ssim(a: np.ndarray, b: np.ndarray, max_shift: int = 2, flip: bool = True,
                 chunk: int = 16) -> tuple[np.ndarray, list[tuple[bool, int, int]]]:
  """Best SSIM of each a[i] (mirrored or not, shifted) against b[i]'s central window.

  Images [n, H, W, 3] in [-1, 1]. For shift (dy, dx) the window a[m+dy : H-m+dy, m+dx : W-m+dx]
  is compared with b[m : H-m, m : W-m] (m = max_shift), so a copy of b shifted by up to m pixels
  either way, mirrored or not, scores as the copy it is. Returns (best SSIM [n], its
  (flipped, dy, dx) per image). SSIM in [0, 1] units (data_range 1), scikit-image's definition.
  Pairs go to the device `chunk` at a time (the last padded: one compile), windows cut there.
  """
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if a.shape != b.shape or a.ndim != 4:
    raise MedjaxError(f"aligned_ssim: two [n, H, W, C] arrays of one shape, got {a.shape}, "
                      f"{b.shape}")
  variants, n = _variants(max_shift, flip), len(a)
  scores = np.empty((n, len(variants)), np.float32)
  for start in range(0, n, chunk):
    xs, ys = a[start:start + chunk], b[start:start + chunk]
    pad = chunk - len(xs)
    if pad:
      xs, ys = (np.concatenate([z, np.repeat(z[-1:], pad, 0)]) for z in (xs, ys))
    got = _aligned_scores((xs + 1) / 2, (ys + 1) / 2, max_shift, flip)
    scores[start:start + chunk] = np.asarray(got)[:chunk - pad]
  best = scores.argmax(1)
  return scores.max(1).astype(np.float64), [variants[v] for v in best]


@functools.partial(jax.jit, static_argnames=("m", "flip"))
def _aligned_scores(a, b, m: int, flip: bool):
  """SSIM [c, V] of each `_variants(m, flip)` window of a[i] against b[i]'s central window
  (images in [0, 1]), one variant at a time."""
  h, w = a.shape[1] - 2 * m, a.shape[2] - 2 * m
  target = b[:, m:m + h, m:m + w]
  sides = jnp.stack([a, a[:, :, ::-1]]) if flip else a[None]
  table = jnp.asarray([(int(f), m + dy, m + dx) for f, dy, dx in _variants(m, flip)], jnp.int32)

  def one(row):
    x = jax.lax.dynamic_index_in_dim(sides, row[0], keepdims=False)
    x = jax.lax.dynamic_slice(x, (0, row[1], row[2], 0), (x.shape[0], h, w, x.shape[3]))
    return recon.ssim(x, target)
  return jax.lax.map(one, table).T


def _ssim_pass(source, name, idx, train_keys, fetch, opt, on_image=None):
  """Best aligned SSIM of every image over its candidates; `on_image(i, key, image, j, cand,
  ssim, variant)` sees each image's best candidate."""
  best, how, row = [], [], 0
  for images, keys in _iterate(source, name):
    n = len(images)
    cand = idx[row:row + n]
    wanted = sorted({train_keys[j] for j in cand.ravel()})
    fetched = np.asarray(fetch(wanted), np.float32)
    if fetched.shape != (len(wanted),) + images.shape[1:]:
      raise MedjaxError(f"fetch: returned {fetched.shape} for {len(wanted)} keys; expected "
                        f"{(len(wanted),) + images.shape[1:]} like the {name} images")
    by_key = dict(zip(wanted, fetched, strict=True))
    others = np.stack([by_key[train_keys[j]] for j in cand.ravel()])
    s, v = aligned_ssim(np.repeat(images, cand.shape[1], 0), others, opt.max_shift, opt.flip)
    s, v = s.reshape(n, -1), [v[r * cand.shape[1]:(r + 1) * cand.shape[1]] for r in range(n)]
    for r in range(n):
      c = int(s[r].argmax())
      best.append(s[r, c])
      how.append(v[r][c])
      if on_image is not None:
        on_image(row + r, keys[r], images[r], cand[r, c], by_key[train_keys[cand[r, c]]],
                 s[r, c], v[r][c])
    row += n
  if row != len(idx):
    raise MedjaxError(f"{name}: the second read gave {row} images, the first {len(idx)}")
  return np.asarray(best), how


# -- the audit -----------------------------------------------------------------------------------

def threshold(values, percentile: float, upper: bool) -> float:
  """The `percentile`-th percentile of held-out `values`, taken conservatively (split-conformal):
  the j-th smallest value with j = `order(n, percentile)`, or, with `upper`, the j-th largest
  with j = `order(n, 100 - percentile)`. A fresh image exchangeable with the n held-out ones
  falls strictly beyond it with probability at most j / (n + 1), at most the tail's share but
  for j = 1 (the most extreme held-out value) when n + 1 < 100 / share: calibrate on enough
  held-out images."""
  v = np.sort(np.asarray(values, np.float64))
  j = order(len(v), (100 - percentile) if upper else percentile)
  return float(v[-j] if upper else v[j - 1])


def order(n: int, tail: float) -> int:
  """j = floor(tail / 100 * (n + 1)), kept within 1..n: the order statistic of a `tail` percent
  conformal threshold on n values."""
  return min(max(1, int(np.floor(tail / 100 * (n + 1) + 1e-9))), n)


def array_batches(images: np.ndarray, keys: Sequence[str], batch_size: int = 16) -> list:
  """Arrays as a (re-iterable) list of (images, keys) batches."""
  return [(images[i:i + batch_size], list(keys[i:i + batch_size]))
          for i in range(0, len(images), batch_size)]


def store_batches(store, keys: Sequence[str] | None = None, batch_size: int = 16) -> Callable:
  """An image store (medjax.eval.image_store) as fresh (images, keys) batches per call, read
  batch by batch; `keys` default to the store's record keys."""
  keys = list(store.keys if keys is None else keys)
  return lambda: ((x, keys[i * batch_size:(i + 1) * batch_size])
                  for i, x in enumerate(store.batches(batch_size)))


def store_fetch(store, keys: Sequence[str] | None = None) -> Callable:
  """`fetch(keys) -> images` reading only those rows of a store (`keys`: its rows' keys,
  default the store's record keys)."""
  row = {str(k): i for i, k in enumerate(store.keys if keys is None else keys)}
  return lambda wanted: store.floats([row[k] for k in wanted])


def array_fetch(images: np.ndarray, keys: Sequence[str]) -> Callable:
  """`fetch(keys) -> images` over arrays."""
  row = {str(k): i for i, k in enumerate(keys)}
  return lambda wanted: images[[row[k] for k in wanted]]


def audit(generated, heldout, train, fetch: Callable, feature_fn: FeatureFn,
          options: Options = Options(), mesh=None, probe=None) -> dict:
  """The audit's results (JSON-able) plus `_gallery`: the closest pairs' images, for
  `medjax.eval.privacy_report.save_gallery`.

  `probe`: batches of known near-copies of training images (e.g. their VAE round trips, what a
  generator that memorised its latents would output), judged by the same rule: the fraction
  flagged (`power`) says what a 0 flag rate of the generated images rules out."""
  opt = options
  opt.check()
  variants = _query_variants(opt)
  m = max(abs(int(s)) for s in opt.query_shifts) if opt.query_shifts else 0
  gen_f, gen_keys = _features(generated, feature_fn, variants, m, "generated")
  held_f, held_keys = _features(heldout, feature_fn, variants, m, "heldout")
  probe_f, probe_keys = (_features(probe, feature_fn, variants, m, "probe") if probe is not None
                         else (gen_f[:0], []))
  train_keys = []

  def train_blocks():
    for images, keys in _iterate(train, "train"):
      train_keys.extend(keys)
      yield _normalise(feature_fn(_crop(images, False, 0, 0, m)))

  d, i = nearest(np.concatenate([gen_f, held_f, probe_f]), train_blocks(), opt.top_k,
                 opt.block_size, mesh)
  if len(set(train_keys)) != len(train_keys):
    raise MedjaxError("train: record keys are not unique")
  ng, nh = len(gen_f), len(held_f)
  gen_d, gen_i = _merge_variants(d[:ng], i[:ng], len(gen_keys), opt.top_k)
  held_d, held_i = _merge_variants(d[ng:ng + nh], i[ng:ng + nh], len(held_keys), opt.top_k)
  held_s, _ = _ssim_pass(heldout, "heldout", held_i, train_keys, fetch, opt)
  # The budget's two tails; a rule with none never flags.
  d_tail, s_tail = opt.percentile * (1 - opt.ssim_share), opt.percentile * opt.ssim_share
  d_thr = threshold(held_d[:, 0], d_tail, upper=False) if d_tail > 0 else -np.inf
  s_thr = threshold(held_s, 100 - s_tail, upper=True) if s_tail > 0 else np.inf
  n_held = len(held_keys)
  bound = sum(order(n_held, t) for t in (d_tail, s_tail) if t > 0) / (n_held + 1)
  gallery, pairs = [], []

  def on_image(r, key, image, j, match, s, how):
    flagged = bool(gen_d[r, 0] < d_thr or s > s_thr)
    pair = {"generated": key, "train": train_keys[j], "feature_rank": int(
        np.flatnonzero(gen_i[r] == j)[0]), "nn_train": train_keys[gen_i[r, 0]],
            "distance": float(gen_d[r, 0]), "ssim": float(s), "flipped": how[0],
            "shift": [how[1], how[2]], "flagged": flagged}
    pairs.append(pair)
    item = (flagged, float(s), -r, pair, image, match)
    if len(gallery) < opt.gallery:
      heapq.heappush(gallery, item)
    elif opt.gallery and item[:3] > gallery[0][:3]:
      heapq.heapreplace(gallery, item)

  gen_s, _ = _ssim_pass(generated, "generated", gen_i, train_keys, fetch, opt, on_image)
  flags = (gen_d[:, 0] < d_thr) | (gen_s > s_thr)
  held_flags = (held_d[:, 0] < d_thr) | (held_s > s_thr)
  power = None
  if probe is not None:
    probe_d, probe_i = _merge_variants(d[ng + nh:], i[ng + nh:], len(probe_keys), opt.top_k)
    probe_s, _ = _ssim_pass(probe, "probe", probe_i, train_keys, fetch, opt)
    probe_flags = (probe_d[:, 0] < d_thr) | (probe_s > s_thr)
    power = {"num_probes": len(probe_keys), "flagged": int(probe_flags.sum()),
             "fraction_flagged": float(probe_flags.mean())}
  return {
      "num_generated": len(gen_keys), "num_heldout": len(held_keys), "num_train": len(train_keys),
      "flagged": int(flags.sum()), "fraction_flagged": float(flags.mean()),
      "heldout_flag_rate": float(held_flags.mean()), "false_positive_bound": bound,
      "thresholds": {"distance": _finite(d_thr), "ssim": _finite(s_thr),
                     "percentile": opt.percentile, "ssim_share": opt.ssim_share},
      "rule": _rule(opt, d_thr, s_thr, bound), "power": power,
      "flagged_pairs": [p for p in pairs if p["flagged"]],
      "distances": {"generated": gen_d[:, 0].tolist(), "heldout": held_d[:, 0].tolist()},
      "ssim": {"generated": gen_s.tolist(), "heldout": held_s.tolist()},
      "_gallery": [g[3:] for g in sorted(gallery, reverse=True)],
  }


# -- report --------------------------------------------------------------------------------------

def _finite(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def _rule(opt: Options, d_thr: float, s_thr: float, bound: float) -> str:
  rules = []
  if np.isfinite(d_thr):
    rules.append(f"the feature NN distance < {d_thr:.4g} (held-out lower "
                 f"{opt.percentile * (1 - opt.ssim_share):g}% tail)")
  if np.isfinite(s_thr):
    rules.append(f"the best aligned SSIM > {s_thr:.4g} (held-out upper "
                 f"{opt.percentile * opt.ssim_share:g}% tail; shifts +-{opt.max_shift} px"
                 f"{', mirrored' if opt.flip else ''}, top {opt.top_k} feature candidates)")
  return (f"flagged when {' or '.join(rules)}: an image like the held-out ones is flagged "
          f"with probability <= {bound:.2%} (budget {opt.percentile:g}%)")


def public(result: dict) -> dict:
  """`result` without its images (for results.json)."""
  return {k: v for k, v in result.items() if not k.startswith("_")}
