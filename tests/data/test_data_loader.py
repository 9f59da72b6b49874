"""The grain pipeline: values, determinism, exact resume, sharding, bad-file policy."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_testlib import save_png
from medjax.data import default_config, loader, make_dataset
from medjax.errors import MedjaxError


def phantom_config(num=24):
  config = default_config()
  config.phantoms.num = num
  config.split.fractions = (1.0, 0.0, 0.0)
  return config


def dataset(config, split="train", batch_size=4, **kwargs):
  kwargs.setdefault("resolution", 16)
  return make_dataset(config, split, batch_size, process_index=kwargs.pop("process_index", 0),
                      process_count=kwargs.pop("process_count", 1), **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert list(x["key"]) == list(y["key"])
    np.testing.assert_array_equal(x["image"], y["image"])
    assert list(x["prompt"]) == list(y["prompt"])


@pytest.fixture
def folder_root(tmp_path):
  """root/<class>/*.png with known pixel values (16 x 16, 8 bit)."""
  rng = np.random.default_rng(0)
  for name in ("effusion", "clear"):
    for i in range(5):
      save_png(str(tmp_path / "folder" / name / f"{i}.png"),
               rng.integers(0, 256, (16, 16), dtype=np.uint8))
  return tmp_path / "folder"


def test_batch_format_and_values(folder_root):
  config = phantom_config()
  config.source, config.root = "folder", str(folder_root)
  config.classes = (("clear", {"clear": 1}), ("effusion", {"effusion": 1}))
  config.prompt.kind = "class"
  batches = list(dataset(config, "train", 3, shuffle=False, num_epochs=1, drop_remainder=False))
  assert [len(b["key"]) for b in batches] == [3, 3, 3, 1]
  batch = batches[0]
  assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
  path = os.path.join(folder_root, batch["key"][0])
  expected = np.asarray(Image.open(path), np.float32) / 255.0 * 2.0 - 1.0
  for channel in range(3):  # grayscale -> 3 equal channels, no resampling at the same size
    np.testing.assert_allclose(batch["image"][0, ..., channel], expected, atol=1e-6)
  assert batch["label"].dtype == np.int32 and list(batch["label"]) == [0, 0, 0]
  assert list(batch["prompt"]) == ["a medical image with clear"] * 3
  assert batch["labels"].shape == (3, 2) and batch["label_mask"].all()


def test_resize_modes():
  image = np.random.default_rng(0).random((20, 40, 1)).astype(np.float32)
  for mode in loader.RESIZE_MODES:
    out = loader.resize_to(image, 16, mode=mode)
    assert out.shape == (16, 16, 1) and 0.0 <= out.min() and out.max() <= 1.0
  padded = loader.resize_to(image, 16, mode="pad")
  assert (padded[:4] == 0).all() and (padded[-4:] == 0).all()  # 20 x 40 -> 8 x 16, centred
  rng = np.random.default_rng(1)
  crops = {loader.resize_to(image, 16, mode="crop", crop="random", rng=rng).tobytes()
           for _ in range(5)}
  assert len(crops) > 1


def test_deterministic_by_seed():
  config = phantom_config()
  first = take(dataset(config, seed=3), 3)
  assert_same_batches(first, take(dataset(config, seed=3), 3))
  other = take(dataset(config, seed=4), 3)
  assert [list(b["key"]) for b in other] != [list(b["key"]) for b in first]
  assert first[0]["image"].min() >= -1.0 and first[0]["image"].max() <= 1.0


@pytest.mark.parametrize("worker_count", [0, 1])
def test_resume_exactly_across_epochs(worker_count):
  config = phantom_config(num=10)
  config.pipeline.worker_count = worker_count
  config.pipeline.crop = "random"
  reference = dataset(config, seed=7, batch_size=3)
  take(reference, 2)
  state = reference.get_state()
  json.dumps(state)  # checkpointable as JSON (orbax / grain handlers)
  expected = take(reference, 5)  # crosses the epoch boundary (10 images, 3 per batch)
  restored = dataset(config, seed=7, batch_size=3)
  restored.set_state(state)
  assert_same_batches(take(restored, 5), expected)
  if worker_count:
    return  # worker start-up costs seconds; the epoch check below needs no workers
  # Every image is seen once per epoch.
  keys = [k for b in take(dataset(config, seed=7, batch_size=5), 2) for k in b["key"]]
  assert len(set(keys)) == 10


def test_process_shards_are_disjoint_and_complete():
  config = phantom_config(num=21)
  shards = []
  for process in range(3):
    iterator = dataset(config, "train", 2, shuffle=False, num_epochs=1, drop_remainder=False,
                       process_index=process, process_count=3)
    shards.append({k for batch in iterator for k in batch["key"]})
  assert sum(len(s) for s in shards) == 21 and len(set.union(*shards)) == 21
  train_shards = [dataset(config, "train", 2, seed=0, process_index=p, process_count=2)
                  for p in range(2)]
  assert not set(next(train_shards[0])["key"]) & set(next(train_shards[1])["key"])


def test_global_batch_blocks_equal_one_process_row_for_row():
  """blocks=True: process i reads block i of each global batch of the 1-process stream (across
  epochs, random crops and flips included), and resumes exactly from its own state."""
  config = phantom_config(num=10)
  config.pipeline.crop, config.pipeline.flip = "random", True
  whole = dataset(config, "train", 6, seed=3, blocks=True)
  parts = [dataset(config, "train", 2, seed=3, process_index=p, process_count=3, blocks=True)
           for p in range(3)]
  for _ in range(4):  # 24 examples: more than two epochs of 10
    want, got = next(whole), [next(p) for p in parts]
    assert list(want["key"]) == [k for g in got for k in g["key"]]
    np.testing.assert_array_equal(want["image"], np.concatenate([g["image"] for g in got]))
  state = parts[1].get_state()
  after = take(parts[1], 2)
  parts[1].set_state(json.loads(json.dumps(state)))
  assert_same_batches(take(parts[1], 2), after)
  with pytest.raises(MedjaxError, match="needs drop_remainder"):
    dataset(config, "train", 2, blocks=True, drop_remainder=False)


def test_bad_file_error_or_skip_counted(folder_root):
  data = (folder_root / "clear" / "0.png").read_bytes()
  (folder_root / "clear" / "0.png").write_bytes(data[:len(data) // 2])
  config = phantom_config()
  config.source, config.root = "folder", str(folder_root)
  with pytest.raises(MedjaxError, match=r"clear/0.png: corrupt or truncated image"):
    list(dataset(config, "train", 2, shuffle=False, num_epochs=1))
  config.on_bad_file = "skip"
  iterator = dataset(config, "train", 2, shuffle=False, num_epochs=1, drop_remainder=False)
  keys = [k for batch in iterator for k in batch["key"]]
  assert len(keys) == 9 and os.path.join("clear", "0.png") not in keys
  assert iterator.num_skipped == 1 and "0.png" in iterator.skip_report()
  assert iterator.get_state()["read_skips"] == 1


def test_index_time_skips_are_reported(chexpert_root):
  os.remove(chexpert_root / "train/patient00003/study1/view1_frontal.jpg")
  config = phantom_config()
  config.source, config.root, config.on_bad_file = "chexpert", str(chexpert_root), "skip"
  iterator = dataset(config, "train", 2, shuffle=False, num_epochs=1)
  assert iterator.num_skipped == 1 and "patient00003" in iterator.skip_report()


def test_too_few_examples_and_bad_options():
  config = phantom_config(num=4)
  with pytest.raises(MedjaxError, match="too few"):
    dataset(config, "train", 8, num_epochs=1)
  config.pipeline.resize = "squash"
  with pytest.raises(MedjaxError, match="pipeline.resize='squash'"):
    dataset(config)
  with pytest.raises(MedjaxError, match="split='dev'"):
    dataset(phantom_config(), "dev")
  config = phantom_config()
  config.source = "imagenet"
  with pytest.raises(MedjaxError, match="source='imagenet'"):
    dataset(config)


def test_missing_root():
  config = phantom_config()
  config.source = "chexpert"
  with pytest.raises(MedjaxError, match="data root is not set"):
    dataset(config)
  config.root = "/nonexistent/chexpert"
  with pytest.raises(MedjaxError, match="/nonexistent/chexpert: CheXpert root directory does not"):
    dataset(config)


def test_orbax_checkpoint_round_trip(tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  config = phantom_config(num=12)
  iterator = dataset(config, seed=1, batch_size=3)
  next(iterator)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 2)
  restored = dataset(config, seed=1, batch_size=3)
  manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 2), expected)
