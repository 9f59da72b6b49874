"""Data faults (issue 15): bad files under on_bad_file='skip' are bounded, counted once each and
reported; bad data values are one-line errors; a SIGTERM does not wait forever for data."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_support import set_dotted
from train_support import tiny_config

from medjax import batches
from medjax import checkpoint as checkpoint_lib
from medjax import preemption
from medjax import trainer
from medjax.data import default_config
from medjax.data import make_dataset
from medjax.data import make_phantoms
from medjax.data import read_image
from medjax.data import skips
from medjax.data import split_file
from medjax.errors import MedjaxError

ROOT = Path(__file__).resolve().parents[1]


def _cxr_root(path: Path, num: int = 12) -> Path:
  make_phantoms.write_chexpert_phantoms(str(path), num, size=64, seed=0)
  return path


def _images(root: Path) -> list[str]:
  return sorted(glob.glob(str(root / "**" / "*.jpg"), recursive=True))


def _truncate(paths) -> None:
  for p in paths:
    open(p, "wb").close()


def _snapshot(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def _data_config(root, **changes):
  c = default_config()
  c.source, c.root, c.on_bad_file = "chexpert", str(root), "skip"
  c.split.mode = "source"
  return set_dotted(c, changes)


def _train_config(root, **changes):
  return tiny_config(**{"data.source": "chexpert", "data.root": str(root),
                        "data.on_bad_file": "skip", "data.split.mode": "source",
                        "total_steps": 6, "checkpoint_every_steps": 3, **changes})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir as a run on CheXpert phantoms (2 bad images of 5) leaves it at step 3 of 6: its
  data position after 3 batches (more than a pass: the bad files were read again) and, to
  compile no train step here, its initial train state saved as step 3."""
  base = tmp_path_factory.mktemp("saved")
  root = _cxr_root(base / "cxr", num=6)
  bad = [p for p in _images(root) if "/train/" in p][:2]
  _truncate(bad)
  config, workdir = _train_config(root), base / "run"
  run = trainer.setup(config)
  workdir.mkdir()
  trainer.write_config(config, workdir)
  data = make_dataset(config.data, "train", config.batch_size, seed=config.seed,
                      resolution=config.resolution, process_index=0, process_count=1,
                      drop_remainder=True, blocks=True)
  split_file.write_records(workdir, config.data, data.records, data.class_names)  # as train does
  for _ in range(3):
    next(data)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", every=3)
  ckpt.save(3, run.state, {"data": [data.get_state()]})
  ckpt.close()
  return root, workdir, bad


def test_skipped_files_counted_once_in_summary_and_log(saved_run, tmp_path, caplog):
  """The run finishing (total_steps=3: no step left) reports the distinct bad files it met,
  carried through the checkpoint: 2, though each was read at least twice."""
  root, workdir, bad = saved_run
  shutil.copytree(workdir, tmp_path / "run")
  caplog.set_level("INFO")
  summary = trainer.train(_train_config(root, total_steps=3), tmp_path / "run")
  assert summary["step"] == 3 and summary["stopped"] is None
  skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"]
  assert skipped == summary["skipped_files"] and skipped["count"] == 2
  assert sorted(e.split(":")[0] for e in skipped["examples"]) == sorted(bad)
  medjax_lines = [r.getMessage() for r in caplog.records if "/orbax/" not in r.pathname]
  assert "2 distinct bad file(s) skipped" in medjax_lines[-1]  # the run's last line says so


def test_all_files_bad_on_resume_is_one_error_and_keeps_the_workdir(saved_run, tmp_path):
  """The same run resumed after its data went bad: one error, its outputs untouched."""
  root, workdir, _ = saved_run
  run, good = tmp_path / "run", tmp_path / "good"
  shutil.copytree(workdir, run)
  os.replace(root, good)  # the run's data.root now holds only 0-byte images
  try:
    shutil.copytree(good, root)
    _truncate(_images(root))
    before = _snapshot(run)
    with pytest.raises(MedjaxError, match=r"of the \d+ files of a data pass are bad, more than "
                       r"config.data.max_bad_fraction=0.5 allows; e.g. .*view1_frontal.jpg"):
      trainer.train(_train_config(root), run)
    after = _snapshot(run)
    assert {k: after[k] for k in before} == before  # (the resumed run opened a new, empty
    assert all(k.startswith("tensorboard/") for k in set(after) - set(before))  # event file)
  finally:
    shutil.rmtree(root, ignore_errors=True)
    os.replace(good, root)


def test_cli_all_files_bad_with_skip_stops_at_once(tmp_path):
  """The issue's command: every JPEG truncated to 0 bytes used to skip forever at full CPU."""
  root = _cxr_root(tmp_path / "D", num=20)
  _truncate(_images(root))
  cmd = [sys.executable, "-m", "medjax.train", "--config=configs/cxr_unet.py",
         f"--workdir={tmp_path / 'W'}", "--config.data.source=chexpert",
         f"--config.data.root={root}", "--config.data.split.mode=source",
         "--config.data.on_bad_file=skip", "--config.progress_bar=False"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert "files of a data pass are bad" in errors[0] and "max_bad_fraction" in errors[0]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.count("skipping bad file") <= skips.MAX_LOGGED
  assert not list((tmp_path / "W" / "checkpoints").glob("*"))


def test_batch_size_zero_says_positive_integer(tmp_path):
  with pytest.raises(MedjaxError, match=r"^config.batch_size=0: expected a positive integer$"):
    trainer.train(tiny_config(batch_size=0), tmp_path / "w")
  with pytest.raises(MedjaxError, match=r"config.data.max_bad_fraction=1.5: expected a number"):
    trainer.train(tiny_config(**{"data.max_bad_fraction": 1.5}), tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_skip_ledger_budget_rules():
  """A pass over the budget stops as soon as that is certain; a shuffled stream is also judged
  on its running share (from MIN_SAMPLE reads); a pass of only bad files always stops."""
  ledger = skips.SkipLedger(index_skipped=[], file_index={}, pass_size=10,
                            max_bad_fraction=0.5, sampled=False)
  for i in range(5):
    ledger.bad(f"f{i}", f"f{i}: broken")
  with pytest.raises(MedjaxError, match=r"^medjax.data: 6 of the 10 files of a data pass"):
    ledger.bad("f5", "f5: broken")
  big = skips.SkipLedger(index_skipped=[], file_index={}, pass_size=100_000,
                         max_bad_fraction=0.5, sampled=True)
  with pytest.raises(MedjaxError, match=rf"of the first {skips.MIN_SAMPLE} files read were bad"):
    for i in range(skips.MIN_SAMPLE):
      if i % 3:
        big.bad(f"f{i}", "broken")
      else:
        big.good()
  lenient = skips.SkipLedger(index_skipped=[], file_index={}, pass_size=3, max_bad_fraction=1.0,
                             sampled=False)
  lenient.bad("a", "a: broken")
  lenient.bad("b", "b: broken")
  with pytest.raises(MedjaxError, match="3 of the 3 files"):
    lenient.bad("c", "c: broken")


def test_bad_files_counted_once_across_passes_and_resume(tmp_path):
  root = _cxr_root(tmp_path / "cxr")
  bad = [p for p in _images(root) if "/train/" in p][:2]
  _truncate(bad)
  config = _data_config(root)
  it = make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1)
  for _ in range(12):  # several passes
    next(it)
  assert it.num_skipped == 2 and it.get_state()["read_skips"] == 2
  state = json.loads(json.dumps(it.get_state()))
  again = make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1)
  again.set_state(state)
  next(again)
  summary = skips.merge([again.skip_summary(), it.skip_summary()])  # e.g. two processes
  assert summary["count"] == 2 and len(summary["examples"]) == 2


def test_index_time_skips_over_budget(tmp_path):
  root = _cxr_root(tmp_path / "cxr")
  for p in _images(root)[:7]:
    os.remove(p)
  with pytest.raises(MedjaxError, match=r"7 of 12 indexed files are bad, more than"):
    make_dataset(_data_config(root), "train", 2, resolution=16, process_index=0,
                 process_count=1)


def test_prefetcher_wakes_for_sigterm_when_data_starved(monkeypatch):
  """A data pipeline that gives nothing: a SIGTERM still ends the wait, with one error."""
  release = threading.Event()

  class Stuck:
    def get_state(self):
      return {}

    def __next__(self):
      release.wait()
      raise StopIteration

  prefetch = batches.Prefetcher(Stuck(), lambda rows, step: rows, first_step=5,
                                preempted_wait_s=0.2)
  monkeypatch.setattr(preemption.WATCH, "requested", True)  # as the SIGTERM watcher sets it
  monkeypatch.setattr(batches, "_POLL_S", 0.02)
  try:
    with pytest.raises(MedjaxError, match=r"SIGTERM while waiting for training data: no batch "
                       r"for step 6 within 0.2 s"):
      prefetch.next()
  finally:
    release.set()
    prefetch.close()


# -- further faults --------------------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
  """A PNG whose header claims `width` x `height` 8-bit gray pixels, with one empty row."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def test_decompression_bomb_png_is_a_bad_file(tmp_path):
  _png_header_only(tmp_path / "huge.png", 30000, 30000)
  with pytest.raises(MedjaxError, match=r"huge.png: Image size \(900000000 pixels\) exceeds"):
    read_image(tmp_path / "huge.png")


def test_tiny_and_sliver_images_are_bad_files(tmp_path):
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    for i in range(3):
      (tmp_path / name).mkdir(exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
          tmp_path / name / f"{i}.png")
  Image.fromarray(np.full((1, 1), 200, np.uint8)).save(tmp_path / "a" / "pixel.png")
  Image.fromarray(np.full((10, 400), 200, np.uint8)).save(tmp_path / "b" / "strip.png")
  config = default_config()
  config.source, config.root, config.split.fractions = "folder", str(tmp_path), (1.0, 0.0, 0.0)
  with pytest.raises(MedjaxError, match=r"pixel.png: image is 1 x 1 px; expected at least 8"):
    list(make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1,
                      shuffle=False, num_epochs=1, drop_remainder=False))
  config.on_bad_file = "skip"
  it = make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1,
                    shuffle=False, num_epochs=1, drop_remainder=False)
  assert sum(len(b["key"]) for b in it) == 6
  assert it.num_skipped == 2 and "more than 16:1" in it.skip_report()


def test_data_root_that_is_a_file(tmp_path):
  (tmp_path / "train.csv").write_text("Path\n")
  with pytest.raises(MedjaxError, match=r"train.csv: CheXpert root is a file, not a directory"):
    make_dataset(_data_config(tmp_path / "train.csv"), "train", 2, process_index=0,
                 process_count=1)


@pytest.mark.parametrize("key,value,message", [
    ("per_class", -1, r"config.data.per_class=-1: expected >= 0"),
    ("pipeline.worker_count", -1, r"config.data.pipeline.worker_count=-1: expected an integer"),
])
def test_bad_data_values(key, value, message):
  config = default_config()
  config.classes = (("pleural_effusion", {"Pleural Effusion": 1}),)
  node = config
  *path, last = key.split(".")
  for name in path:
    node = node[name]
  node[last] = value
  with pytest.raises(MedjaxError, match=message):
    make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1)


def test_picai_study_with_a_vector_series_counts_once(tmp_path):
  sitk = pytest.importorskip("SimpleITK")
  make_phantoms.write_picai_phantoms(str(tmp_path), 4, size=64, slices=12, seed=5,
                                     lesion_fraction=0.5)
  config = default_config()
  config.source, config.root, config.on_bad_file = "picai", str(tmp_path), "skip"
  config.picai.spacing, config.picai.crop = (3.6, 3.0, 3.0), (12, 48, 48)
  config.split.fractions = (1.0, 0.0, 0.0)
  adc = sorted(glob.glob(str(tmp_path / "**" / "*_adc.mha"), recursive=True))[0]
  sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 40, 40, 3), np.float32), isVector=True),
                  adc)
  it = make_dataset(config, "train", 2, resolution=16, process_index=0, process_count=1,
                    shuffle=False, num_epochs=1, drop_remainder=False)
  assert sum(len(b["key"]) for b in it) > 0
  assert it.num_skipped == 1 and "3 component(s)" in it.skip_report()  # one study, 12 slices
