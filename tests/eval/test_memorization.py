"""Privacy audit: planted near-copies of training images are flagged, fresh images within the
false-positive budget; the block search is exact, the aligned SSIM scikit-image's; bad inputs
are one-line errors."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from medjax.data import phantoms
from medjax.errors import MedjaxError
from medjax.eval import inception_weights
from medjax.eval import memorization as mem
from medjax.eval import privacy_report
from medjax.eval import protocols
from medjax.sharding import make_mesh
from medjax.train_config import check_train_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "eval_privacy.py"
SIZE = 32


def phantom_set(seeds) -> np.ndarray:
  return np.stack([np.repeat(phantoms.chest_xray(SIZE, seed=s, effusion=bool(s % 2))[..., None],
                             3, -1) * 2 - 1 for s in seeds]).astype(np.float32)


def keys(prefix, n):
  return [f"{prefix}/{i}" for i in range(n)]


def planted_copies(src: np.ndarray) -> dict[str, np.ndarray]:
  noise = np.random.default_rng(0).normal(0, 0.02, src.shape)
  return {"exact": src, "mirrored": src[:, :, ::-1], "shift_x+2": np.roll(src, 2, axis=2),
          "shift_y-2": np.roll(src, -2, axis=1),
          "noise": np.clip(src + noise, -1, 1).astype(np.float32)}


def brute_force(q, r, k):
  s = q.astype(np.float64) @ r.astype(np.float64).T
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.sqrt(np.maximum(0, 2 - 2 * np.take_along_axis(s, idx, 1))), idx


@pytest.mark.parametrize("block_size,use_mesh", [(64, False), (5000, False), (100, True)])
def test_block_search_equals_brute_force(block_size, use_mesh):
  rng = np.random.default_rng(1)
  q, r = (mem._normalise(rng.standard_normal((n, 24))) for n in (37, 1000))
  blocks = np.array_split(r, [3, 70, 71, 500, 933])  # ragged blocks are regrouped
  d, i = mem.nearest(q, blocks, k=5, block_size=block_size,
                     mesh=make_mesh(data=-1) if use_mesh else None)
  bd, bi = brute_force(q, r, 5)
  np.testing.assert_array_equal(i, bi)
  np.testing.assert_allclose(d, bd, atol=1e-5)


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory):
  train, held, fresh = (phantom_set(range(a, a + 200)) for a in (0, 1000, 2000))
  planted = planted_copies(train[:4])
  gen = np.concatenate(list(planted.values()) + [fresh])
  gen_keys = [f"{kind}/{j}" for kind in planted for j in range(4)] + keys("fresh", 200)
  train_keys = keys("train", 200)
  opt = mem.Options(top_k=3, batch_size=64)
  # The power probe: the 20 planted copies again, then 20 fresh phantoms, under other keys.
  probe = np.concatenate([gen[:20], fresh[:20]])
  result = mem.audit(mem.array_batches(gen, gen_keys, 64), mem.array_batches(held, keys("held",
                     200), 64), iter(mem.array_batches(train, train_keys, 64)),
                     mem.array_fetch(train, train_keys), mem.pixel_feature_fn(16), opt,
                     probe=mem.array_batches(probe, keys("probe", 40), 16))
  out = tmp_path_factory.mktemp("privacy")
  privacy_report.plot_histograms(result, out / "distances.png")
  assert privacy_report.save_gallery(result, out / "pairs.png")
  return result, opt, out


def test_planted_copies_flagged_fresh_phantoms_not(acceptance):
  result, opt, _ = acceptance
  flagged = {p["generated"]: p for p in result["flagged_pairs"]}
  planted = [k for k in flagged if not k.startswith("fresh/")]
  assert len(planted) == 20  # exact, mirrored, +-2 px shifted, noisy: every one
  for k in planted:  # ... matched with the training image it copies
    assert flagged[k]["train"] == f"train/{k.split('/')[1]}", flagged[k]
  assert flagged["mirrored/0"]["flipped"] and flagged["shift_x+2/1"]["shift"] == [0, 2]
  # The budget p = 1% is split between the two rules, each a held-out 0.5% tail: with 200
  # held-out images each is the most extreme one (j = floor(0.005 * 201) = 1), so an image
  # like them is flagged with probability <= 2 / 201 (the rules' tails may overlap).
  assert result["false_positive_bound"] == pytest.approx(2 / 201)
  assert result["thresholds"]["distance"] == min(result["distances"]["heldout"])
  assert result["thresholds"]["ssim"] == max(result["ssim"]["heldout"])
  assert result["heldout_flag_rate"] <= opt.percentile / 100
  fresh_fp = (len(flagged) - 20) / 200  # the realised rate on 200 fresh phantoms
  assert fresh_fp <= opt.percentile / 100
  assert result["num_train"] == 200 and result["num_heldout"] == 200
  # The probe is judged by the same rule: its copies flagged as the generated ones were.
  fresh_flagged = sum(f"fresh/{j}" in flagged for j in range(20))
  assert result["power"] == {"num_probes": 40, "flagged": 20 + fresh_flagged,
                             "fraction_flagged": (20 + fresh_flagged) / 40}


def test_report_files(acceptance):
  result, _, out = acceptance
  public = json.loads(json.dumps(mem.public(result)))
  assert "_gallery" not in public and public["flagged"] == len(public["flagged_pairs"])
  with Image.open(out / "pairs.png") as img:
    assert img.text["synthetic"] == "true" and img.height == 16 * (96 + 4)
  with Image.open(out / "distances.png") as img:
    assert img.size == (640, 400)


def test_threshold_is_a_conservative_percentile():
  v = np.arange(1, 200)  # n = 199: j = floor(0.01 * 200) = 2
  assert mem.threshold(v, 1, upper=False) == 2 and mem.threshold(v, 99, upper=True) == 198
  assert mem.threshold(v[:10], 1, upper=False) == 1  # too few: the most extreme one


def test_inception_path_flags_a_copy():
  """Random-weight Inception features (a CPU compiles the network once: batches of 2)."""
  train, held = phantom_set(range(4)), phantom_set(range(100, 103))
  gen = np.concatenate([train[:1], phantom_set([200])])
  params = inception_weights.random_inception(0)
  opt = mem.Options(top_k=2, percentile=50, query_shifts=(), flip=False, max_shift=1,
                    batch_size=2)
  result = mem.audit([(gen, ["copy", "fresh"])], [(held, keys("held", 3))],
                     [(train, keys("train", 4))], mem.array_fetch(train, keys("train", 4)),
                     mem.inception_feature_fn(params, batch_size=2), opt)
  copy = [p for p in result["flagged_pairs"] if p["generated"] == "copy"]
  assert copy and copy[0]["train"] == "train/0" and copy[0]["distance"] < 1e-3
  assert result["power"] is None  # no probe given


def test_aligned_ssim_equals_skimage_over_the_alignment_search():
  """Each pair's best SSIM over shifts and the flip is scikit-image's SSIM of the aligned
  windows, maximised by brute force; a ragged last chunk (2 + 1 pairs) changes nothing."""
  rng = np.random.default_rng(3)
  b = phantom_set([5, 6, 7])[:, :24, :24]
  a = np.clip(b + rng.normal(0, 0.3, b.shape), -1, 1).astype(np.float32)
  a[1] = np.roll(b[1], -1, axis=1)[:, ::-1]  # b[1] shifted left 1 px, then mirrored
  got, how = mem.aligned_ssim(a, b, max_shift=1, flip=True, chunk=2)
  for i in range(3):
    target = (b[i, 1:-1, 1:-1].astype(np.float64) + 1) / 2
    ref = {v: structural_similarity((mem._crop(a[i:i + 1], *v, 1)[0].astype(np.float64) + 1) / 2,
                                    target, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0,
                                    channel_axis=-1) for v in mem._variants(1, True)}
    assert abs(got[i] - max(ref.values())) <= 1e-4, (i, got[i], max(ref.values()))
    assert ref[how[i]] == max(ref.values())
  assert how[1] == (True, 0, -1) and got[1] > 0.999


def test_budget_split_between_the_rules():
  """privacy.ssim_share of the false-positive budget to the SSIM rule, the rest to the distance
  rule: each threshold the conformal order statistic of its tail, a rule with no share off."""
  images, k = phantom_set(range(6)), keys("t", 6)
  held = phantom_set(range(50, 60))
  copies = lambda: mem.array_batches(images[:3], k[:3], 2)  # a function: fresh batches per read
  for share, tails in ((0.0, (20, 0)), (1.0, (0, 20)), (0.5, (10, 10))):
    r = mem.audit(copies, mem.array_batches(held, keys("h", 10)), [(images, k)],
                  mem.array_fetch(images, k), mem.pixel_feature_fn(8),
                  mem.Options(top_k=2, percentile=20, ssim_share=share, max_shift=1,
                              query_shifts=()))
    t, d, s = r["thresholds"], sorted(r["distances"]["heldout"]), sorted(r["ssim"]["heldout"])
    j = [mem.order(10, tail) for tail in tails]  # floor(tail / 100 * 11): 2, or 1 and 1
    assert t["distance"] == (d[j[0] - 1] if tails[0] else None)
    assert t["ssim"] == (s[-j[1]] if tails[1] else None)
    assert r["false_positive_bound"] == pytest.approx(2 / 11)
    assert r["flagged"] == 3, share  # exact copies: beyond either rule's threshold


def test_bad_inputs():
  images, k = phantom_set(range(3)), keys("t", 3)
  fetch, fn = mem.array_fetch(images, k), mem.pixel_feature_fn(8)
  run = lambda g, opt=None, f=fetch, feat=fn: mem.audit(
      g, [(images, k)], [(images, k)], f, feat, opt or mem.Options(top_k=2))
  with pytest.raises(MedjaxError, match="top_k=0"):
    run([(images, k)], mem.Options(top_k=0))
  with pytest.raises(MedjaxError, match="percentile=150"):
    run([(images, k)], mem.Options(percentile=150))
  with pytest.raises(MedjaxError, match="percentile=0"):
    run([(images, k)], mem.Options(percentile=0))
  with pytest.raises(MedjaxError, match="ssim_share=1.5"):
    run([(images, k)], mem.Options(ssim_share=1.5))
  with pytest.raises(MedjaxError, match="query_shifts"):
    run([(images, k)], mem.Options(query_shifts=(-3, 0)))
  with pytest.raises(MedjaxError, match="fewer than top_k=5"):
    run([(images, k)], mem.Options(top_k=5))
  with pytest.raises(MedjaxError, match="one-shot iterator"):
    run(iter([(images, k)]))
  with pytest.raises(MedjaxError, match=r"in \[-1, 1\]"):
    run([(images * 3, k)])
  with pytest.raises(MedjaxError, match="B keys"):
    run([(images, k[:2])])
  with pytest.raises(MedjaxError, match="fetch: returned"):
    run([(images, k)], f=lambda w: images[:1])
  with pytest.raises(MedjaxError, match="all-zero"):
    run([(np.zeros_like(images), k)])
  with pytest.raises(MedjaxError, match="expected"):
    mem.nearest(np.ones((2, 4), np.float32) / 2, [np.ones((3, 5), np.float32)], k=1)


def test_privacy_config_is_valid():
  spec = importlib.util.spec_from_file_location("eval_privacy", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  check_train_config(config, protocols.base_config(),
                     free_maps=("data.prompt.class_prompts", "data.prompt.label_texts",
                                "generation.prompts"))
  assert config.protocol == "privacy" and "privacy" in protocols.PROTOCOLS
  mem.Options.from_config(config.privacy).check()


@pytest.mark.slow(reason="generation with the embedded model: minutes on 2 cores")
def test_privacy_protocol_writes_its_report(tmp_path):
  spec = importlib.util.spec_from_file_location("eval_privacy", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.privacy.features = "pixels"
  config.generation.num_per_class = 2
  config.generation.num_inference_steps = 2
  config.progress_bar = False
  results = protocols.run_protocol(config, tmp_path)
  assert results["num_generated"] == 4 and results["num_heldout"] == 16
  for out in ("results.json", "results.md", "privacy_distances.png", "privacy_pairs.png"):
    assert (tmp_path / out).exists(), out
  assert all(p["train"].startswith("phantom_cxr/") for p in results["flagged_pairs"])
  assert results["train_images"] == "real train split"  # no generator workdir: noted
  assert any(n.startswith("privacy audit: the generator's training images are unknown")
             for n in results["notes"])
