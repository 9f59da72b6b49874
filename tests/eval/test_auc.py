"""AUC statistics vs scikit-learn, with ties; bad input is an error, never NaN."""
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from medjax.errors import MedjaxError
from medjax.eval import auc


def _data(n=200, seed=0, ties=True):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  scores = rng.normal(labels * 0.8, 1.0)
  if ties:  # coarse scores: many ties, some across classes
    scores = np.round(scores, 1)
  return labels, scores


@pytest.mark.parametrize("seed,ties", [(0, True), (1, True), (2, False)])
def test_roc_auc_and_curve_match_sklearn(seed, ties):
  labels, scores = _data(seed=seed, ties=ties)
  assert abs(auc.roc_auc(labels, scores) - skm.roc_auc_score(labels, scores)) <= 1e-12
  for drop in (True, False):
    got = auc.roc_curve(labels, scores, drop_intermediate=drop)
    ref = skm.roc_curve(labels, scores, drop_intermediate=drop)
    for g, r in zip(got, ref):
      assert g.shape == r.shape
      np.testing.assert_allclose(g, r, atol=1e-12, rtol=0)


def test_all_ties_and_perfect_separation():
  assert auc.roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
  assert auc.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert auc.roc_auc([True, False], [0.0, 1.0]) == 0.0


def test_multilabel_macro_with_mask_matches_sklearn():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, (120, 3)).astype(float)
  scores = np.round(rng.normal(labels, 1.0), 1)
  labels[rng.random(labels.shape) < 0.2] = np.nan  # unknown
  labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 1.0)  # one class only -> skipped
  got = auc.multilabel_auc(labels, scores, names=["a", "b", "c"])
  ref = []
  for j in range(2):
    known = ~np.isnan(labels[:, j])
    ref.append(skm.roc_auc_score(labels[known, j], scores[known, j]))
    assert abs(got["per_label"]["ab"[j]] - ref[-1]) <= 1e-12
  assert abs(got["macro"] - np.mean(ref)) <= 1e-12
  assert got["skipped"] == ["c"] and got["per_label"]["c"] is None
  # An explicit mask wins over NaN detection; -1 also reads as unknown by default.
  minus = np.where(np.isnan(labels), -1, labels)
  assert auc.multilabel_auc(minus, scores)["macro"] == pytest.approx(got["macro"], abs=1e-12)


def test_threshold_metrics():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
  scores = np.array([0.9, 0.6, 0.4, 0.2, 0.5, 0.1, 0.7, 0.5])
  pred = scores >= 0.5
  got = auc.threshold_metrics(labels, scores, 0.5)
  assert got["accuracy"] == skm.accuracy_score(labels, pred)
  assert got["sensitivity"] == skm.recall_score(labels, pred)
  assert got["specificity"] == skm.recall_score(1 - labels, ~pred)


def test_bootstrap_ci_and_mean_std():
  labels, scores = _data(n=100, seed=4)
  ci = auc.bootstrap_ci(labels, scores, n=300, seed=7)
  assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["n"] + ci["skipped"] == 300
  assert ci == auc.bootstrap_ci(labels, scores, n=300, seed=7)  # deterministic
  assert ci["estimate"] == auc.roc_auc(labels, scores)
  # Tiny, imbalanced sample: single-class resamples are skipped and counted.
  small = auc.bootstrap_ci([1, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.3, 0.4], n=200, seed=0)
  assert small["skipped"] > 0 and small["n"] == 200 - small["skipped"]
  ms = auc.mean_std([0.8, 0.9, 0.85])
  assert ms["mean"] == pytest.approx(0.85) and ms["std"] == pytest.approx(0.05) and ms["n"] == 3


@pytest.mark.parametrize("labels,scores,match", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "every label is positive"),
    ([0, 0], [0.1, 0.2], "every label is negative"),
    ([0, 1, 1], [0.1, 0.2], "3 labels but 2 scores"),
    ([0, 1], [0.1, np.nan], "NaN or infinite"),
    ([0, 2], [0.1, 0.2], "must be 0/1"),
])
def test_bad_input_raises(labels, scores, match):
  with pytest.raises(MedjaxError, match=match):
    auc.roc_auc(labels, scores)


def test_bad_input_elsewhere():
  with pytest.raises(MedjaxError, match="one class"):
    auc.bootstrap_ci([1, 1], [0.1, 0.2])
  with pytest.raises(MedjaxError, match="no label column"):
    auc.multilabel_auc(np.ones((4, 2)), np.zeros((4, 2)))
  with pytest.raises(MedjaxError, match="more than 1 values"):
    auc.mean_std([0.9])
  with pytest.raises(MedjaxError, match="without positive"):
    auc.sensitivity([0, 0], [0.1, 0.9])


def test_plot_roc_writes_png(tmp_path):
  labels, scores = _data()
  fpr, tpr, _ = auc.roc_curve(labels, scores)
  path = auc.plot_roc({"real": (fpr, tpr, auc.roc_auc(labels, scores)),
                       "synthetic": (fpr ** 0.5, tpr, 0.7)}, tmp_path / "roc" / "roc.png")
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size == (560, 560)
  assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temp file left behind
