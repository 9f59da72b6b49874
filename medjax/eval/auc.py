"""ROC AUC and the statistics around it (NumPy, float64): curves, bootstrap CIs, repeats.

AUC is the Mann-Whitney statistic with midranks for ties, which is exactly the trapezoidal
area under scikit-learn's ROC curve (`roc_auc_score`). Bad input (one class only, lengths that
differ, non-finite scores) raises `MedjaxError` instead of returning NaN.
"""
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageDraw
from scipy import stats as scipy_stats

from medjax.atomic import atomic_path
from medjax.errors import MedjaxError


def _binary_inputs(labels, scores, name: str) -> tuple[np.ndarray, np.ndarray]:
  labels = np.asarray(labels)
  scores = np.asarray(scores, np.float64)
  if labels.ndim != 1 or scores.ndim != 1:
    raise MedjaxError(f"{name}: labels and scores must be 1-D, got shapes {labels.shape} and "
                      f"{scores.shape}")
  if labels.shape != scores.shape:
    raise MedjaxError(f"{name}: {labels.shape[0]} labels but {scores.shape[0]} scores")
  if labels.size == 0:
    raise MedjaxError(f"{name}: no samples")
  if not np.all(np.isfinite(scores)):
    raise MedjaxError(f"{name}: {int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite")
  values = np.unique(labels)
  if not np.all(np.isin(values, (0, 1))):
    raise MedjaxError(f"{name}: labels must be 0/1 (or bool), got values {values[:5].tolist()}")
  return labels.astype(bool), scores


def _require_both_classes(labels: np.ndarray, name: str) -> tuple[int, int]:
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    only = "positive" if n_neg == 0 else "negative"
    raise MedjaxError(f"{name}: AUC is undefined when every label is {only} "
                      f"({labels.size} samples, one class)")
  return n_pos, n_neg


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve; ties count 1/2 (as `sklearn.metrics.roc_auc_score`)."""
  labels, scores = _binary_inputs(labels, scores, "roc_auc")
  n_pos, n_neg = _require_both_classes(labels, "roc_auc")
  ranks = scipy_stats.rankdata(scores)  # midranks for ties
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def roc_curve(labels, scores, drop_intermediate: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) as `sklearn.metrics.roc_curve`; thresholds[0] is +inf.

  One point per distinct score (tied scores move together); `drop_intermediate` drops
  collinear points as scikit-learn does.
  """
  labels, scores = _binary_inputs(labels, scores, "roc_curve")
  _require_both_classes(labels, "roc_curve")
  order = np.argsort(scores, kind="mergesort")[::-1]
  scores, labels = scores[order], labels[order].astype(np.float64)
  distinct = np.where(np.diff(scores))[0]
  threshold_idxs = np.r_[distinct, labels.size - 1]
  tps = np.cumsum(labels)[threshold_idxs]
  fps = 1 + threshold_idxs - tps
  thresholds = scores[threshold_idxs]
  if drop_intermediate and fps.size > 2:
    keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
    fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
  tps, fps = np.r_[0, tps], np.r_[0, fps]
  thresholds = np.r_[np.inf, thresholds]
  return fps / fps[-1], tps / tps[-1], thresholds


def multilabel_auc(labels, scores, mask=None, names=None) -> dict:
  """Macro AUC over label columns ([N, L]), using only entries where `mask` is true.

  `mask` ([N, L] bool) marks known labels (default: labels that are finite and >= 0, so NaN
  or -1 mean unknown). Columns with one class among their known entries are skipped and
  listed in 'skipped'; if all are, this raises. Returns {'macro': float, 'per_label':
  {name: auc or None}, 'skipped': [names], 'counts': {name: (n_pos, n_neg)}}.
  """
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  if labels.ndim != 2 or labels.shape != scores.shape:
    raise MedjaxError(f"multilabel_auc: labels and scores must both be [N, L], got "
                      f"{labels.shape} and {scores.shape}")
  if mask is None:
    mask = np.isfinite(labels) & (labels >= 0)
  mask = np.asarray(mask, bool)
  if mask.shape != labels.shape:
    raise MedjaxError(f"multilabel_auc: mask shape {mask.shape} != labels shape {labels.shape}")
  names = list(names) if names is not None else [str(i) for i in range(labels.shape[1])]
  if len(names) != labels.shape[1]:
    raise MedjaxError(f"multilabel_auc: {len(names)} names for {labels.shape[1]} label columns")
  per_label, skipped, counts = {}, [], {}
  for j, name in enumerate(names):
    known = mask[:, j]
    y = labels[known, j]
    n_pos = int(np.sum(y == 1))
    counts[name] = (n_pos, int(y.size - n_pos))
    if n_pos == 0 or n_pos == y.size:
      per_label[name] = None
      skipped.append(name)
      continue
    per_label[name] = roc_auc(y, scores[known, j])
  valid = [v for v in per_label.values() if v is not None]
  if not valid:
    raise MedjaxError(f"multilabel_auc: no label column has both classes among known labels "
                      f"(counts {counts})")
  return {"macro": float(np.mean(valid)), "per_label": per_label, "skipped": skipped,
          "counts": counts}


def _predictions(labels, scores, threshold: float, name: str):
  labels, scores = _binary_inputs(labels, scores, name)
  return labels, scores >= threshold


def accuracy(labels, scores, threshold: float = 0.5) -> float:
  """Fraction of samples with (score >= threshold) == label."""
  labels, pred = _predictions(labels, scores, threshold, "accuracy")
  return float(np.mean(pred == labels))


def sensitivity(labels, scores, threshold: float = 0.5) -> float:
  """True positive rate at `threshold` (score >= threshold is positive)."""
  labels, pred = _predictions(labels, scores, threshold, "sensitivity")
  if not labels.any():
    raise MedjaxError("sensitivity: undefined without positive labels")
  return float(np.mean(pred[labels]))


def specificity(labels, scores, threshold: float = 0.5) -> float:
  """True negative rate at `threshold` (score < threshold is negative)."""
  labels, pred = _predictions(labels, scores, threshold, "specificity")
  if labels.all():
    raise MedjaxError("specificity: undefined without negative labels")
  return float(np.mean(~pred[~labels]))


def threshold_metrics(labels, scores, threshold: float = 0.5) -> dict[str, float]:
  """{'accuracy', 'sensitivity', 'specificity'} at one threshold."""
  return {"accuracy": accuracy(labels, scores, threshold),
          "sensitivity": sensitivity(labels, scores, threshold),
          "specificity": specificity(labels, scores, threshold)}


def bootstrap_ci(labels, scores, metric: Callable = roc_auc, n: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
  """Percentile bootstrap CI of `metric(labels, scores)` over resampled samples.

  Resamples (with replacement, NumPy `default_rng(seed)`) that contain one class only are
  skipped, not redrawn, and counted in 'skipped'. Returns {'estimate' (on all data), 'low',
  'high', 'alpha', 'n' (resamples used), 'skipped'}.
  """
  labels, scores = _binary_inputs(labels, scores, "bootstrap_ci")
  if not 0 < alpha < 1:
    raise MedjaxError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha}")
  if n < 1:
    raise MedjaxError(f"bootstrap_ci: n must be >= 1, got {n}")
  estimate = float(metric(labels, scores))
  rng = np.random.default_rng(seed)
  values, skipped = [], 0
  for _ in range(n):
    idx = rng.integers(0, labels.size, labels.size)
    y = labels[idx]
    if y.all() or not y.any():
      skipped += 1
      continue
    values.append(float(metric(y, scores[idx])))
  if not values:
    raise MedjaxError(f"bootstrap_ci: all {n} resamples had a single class")
  low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return {"estimate": estimate, "low": float(low), "high": float(high), "alpha": alpha,
          "n": len(values), "skipped": skipped}


def mean_std(values, ddof: int = 1) -> dict[str, float]:
  """{'mean', 'std', 'n'} over repeats (sample std, ddof=1, by default)."""
  values = np.asarray(values, np.float64).ravel()
  if values.size <= ddof:
    raise MedjaxError(f"mean_std: need more than {ddof} values for std with ddof={ddof}, "
                      f"got {values.size}")
  if not np.all(np.isfinite(values)):
    raise MedjaxError("mean_std: values contain NaN or infinity")
  return {"mean": float(values.mean()), "std": float(values.std(ddof=ddof)), "n": int(values.size)}


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_roc(curves: dict, path, title: str = "ROC", size: int = 560) -> Path:
  """Writes ROC curves {name: (fpr, tpr, auc)} as a PNG (PIL drawing), atomically.

  matplotlib is not a medjax dependency; PIL draws axes, the chance diagonal, one coloured
  curve per entry and a legend 'name (AUC 0.xxx)'.
  """
  if not curves:
    raise MedjaxError("plot_roc: no curves given")
  path = Path(path)
  img = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(img)
  left, top, right, bottom = 60, 40, size - 20, size - 50
  to_px = lambda f, t: (left + f * (right - left), bottom - t * (bottom - top))
  draw.rectangle([left, top, right, bottom], outline="black")
  for i in range(1, 5):  # grid and ticks every 0.25
    v = i / 4
    x, y = to_px(v, v)
    draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
    draw.line([(left, y), (right, y)], fill=(225, 225, 225))
  for i in range(5):
    v = i / 4
    x, y = to_px(v, v)
    draw.text((x - 10, bottom + 5), f"{v:.2f}", fill="black")
    draw.text((left - 35, y - 5), f"{v:.2f}", fill="black")
  draw.line([to_px(0, 0), to_px(1, 1)], fill=(150, 150, 150), width=1)
  draw.text(((left + right) / 2 - 60, bottom + 25), "false positive rate", fill="black")
  draw.text((5, top - 25), "true positive rate", fill="black")
  draw.text(((left + right) / 2 - 20, 10), title, fill="black")
  for k, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size < 2:
      raise MedjaxError(f"plot_roc: curve {name!r} needs 1-D fpr and tpr of one length >= 2")
    color = _COLORS[k % len(_COLORS)]
    draw.line([to_px(f, t) for f, t in zip(fpr, tpr, strict=True)], fill=color, width=2)
    ly = bottom - 20 - 16 * (len(curves) - 1 - k)
    draw.line([(right - 200, ly + 6), (right - 180, ly + 6)], fill=color, width=3)
    draw.text((right - 175, ly), f"{name} (AUC {float(auc):.3f})", fill="black")
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return path
