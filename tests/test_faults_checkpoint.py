"""Damaged, foreign and non-finite checkpoints, and readers of a live run (issue 15): each fault
ends in one line (a warning when an older step can be used, else a MedjaxError) and nothing
good in the workdir is changed."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import checkpoint as checkpoint_lib
from medjax import exporter
from medjax import trainer
from medjax.data import make_dataset
from medjax.errors import MedjaxError
from tests.train_support import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# How orbax (0.12) names a step's folder while it is written, and how older versions did.
TMP_NAMES = ("4.orbax-checkpoint-tmp", "5.orbax-checkpoint-tmp-1234567")


def _state(seed: int, bad=None) -> dict:
  rng = np.random.default_rng(seed)  # random values: the data files are large enough to damage
  a = rng.standard_normal((128, 128)).astype(np.float32)
  if bad is not None:
    a[3, 5] = bad
  return {"a": jnp.asarray(a), "b": {"c": jnp.arange(10.0) + seed}, "n": jnp.int32(seed)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _largest_data_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _snapshot(root: Path) -> dict:
  return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
          if p.is_file()}


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"
          and r.getMessage().startswith("checkpoint:")]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
  """Checkpoints 1, 2, 3 of a small state (no model: the faults are in the files)."""
  directory = tmp_path_factory.mktemp("small") / "ckpt"
  ckpt = checkpoint_lib.Checkpointer(directory, keep=10, every=1)
  for step in (1, 2, 3):
    assert ckpt.save(step, _state(step), {"data": [{"i": step}]})
  ckpt.close()
  return directory


@pytest.fixture
def run_copy(small_run, tmp_path):
  directory = tmp_path / "ckpt"
  shutil.copytree(small_run, directory)
  return directory


@pytest.mark.parametrize("damage", ["truncated_data", "empty_extra", "garbled_metadata",
                                    "missing_item"])
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(run_copy, damage, caplog):
  step3 = run_copy / "3"
  if damage == "truncated_data":
    os.truncate(_largest_data_file(step3), 100)
  elif damage == "empty_extra":
    os.truncate(step3 / "extra" / "metadata", 0)
  elif damage == "garbled_metadata":
    (step3 / "state" / "_METADATA").write_bytes(b"\xff" * 64)
  else:
    shutil.rmtree(step3 / "state")
  ckpt = checkpoint_lib.Checkpointer(run_copy, keep=10, every=1)
  state, extra, step = ckpt.restore(_abstract(_state(0)))
  assert (step, extra) == (2, {"data": [{"i": 2}]})
  np.testing.assert_array_equal(state["a"], _state(2)["a"])
  aside = run_copy.parent / "ckpt_unreadable" / "3"
  [warning] = _warnings(caplog)
  assert warning.startswith(f"checkpoint: skipped step 3 in {run_copy}: its data cannot be read (")
  assert warning.endswith(f"; moved to {aside}; using step 2") and "\n" not in warning
  assert aside.is_dir() and ckpt.all_steps() == [1, 2]
  assert ckpt.save(3, _state(33), {"data": [{"i": 33}]})  # the step number is free again
  ckpt.close()
  assert checkpoint_lib.Checkpointer(run_copy, keep=10).restore(_abstract(_state(0)))[2] == 3


def test_non_finite_checkpoint_is_skipped_and_save_refuses_nan(run_copy, caplog, monkeypatch):
  ckpt = checkpoint_lib.Checkpointer(run_copy, keep=10, every=1)
  for bad in (np.nan, np.inf):
    with pytest.raises(MedjaxError, match=r"^step 4: the train state holds NaN or Inf values; "
                       r"not saved to .*ckpt \(last good checkpoint: step 3\)$"):
      ckpt.save(4, _state(4, bad=bad), {"data": []})
  assert ckpt.all_steps() == [1, 2, 3] and sorted(os.listdir(run_copy)) == ["1", "2", "3"]
  with monkeypatch.context() as m:  # a NaN checkpoint as an older medjax could write it
    m.setattr(checkpoint_lib, "all_finite", lambda tree: True)
    ckpt.save(4, _state(4, bad=np.nan), {"data": [{"i": 4}]})
  _, _, step = ckpt.restore(_abstract(_state(0)))
  assert step == 3
  [warning] = _warnings(caplog)
  assert warning == (f"checkpoint: skipped step 4 in {run_copy}: it holds NaN or Inf values; "
                     f"moved to {run_copy.parent / 'ckpt_unreadable' / '4'}; using step 3")
  ckpt.close()


def test_all_finite_sees_every_floating_leaf_on_both_paths():
  good = {"w": jnp.ones((3, 4)), "h": jnp.ones(5, jnp.bfloat16), "i": jnp.int32(7),
          "mu": [jnp.zeros(2), np.float32(1.0)]}
  bad_bf16 = {**good, "h": good["h"].at[2].set(jnp.inf)}
  bad_nested = {**good, "mu": [jnp.zeros(2).at[1].set(jnp.nan), np.float32(1.0)]}
  assert checkpoint_lib.all_finite(good) and checkpoint_lib.all_finite({"i": jnp.int32(1)})
  assert not checkpoint_lib.all_finite(bad_bf16) and not checkpoint_lib.all_finite(bad_nested)
  # The jitted reduction that accelerators and several processes use (CPU reads in place).
  jitted = checkpoint_lib._all_finite  # pylint: disable=protected-access
  assert [bool(jitted(t)) for t in (good, bad_bf16, bad_nested)] == [True, False, False]


@pytest.mark.parametrize("change", ["shape", "extra_leaf", "missing_leaf"])
def test_checkpoint_of_another_config_is_one_line_and_moves_nothing(run_copy, change, caplog):
  os.truncate(_largest_data_file(run_copy / "3"), 100)  # damaged too: still nothing moves
  before = _snapshot(run_copy)
  target = _abstract(_state(0))
  if change == "shape":
    target["a"] = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=target["a"].sharding)
  elif change == "extra_leaf":
    target["ema"] = target["n"]
  else:
    del target["n"]
  ckpt = checkpoint_lib.Checkpointer(run_copy, keep=10)
  with pytest.raises(MedjaxError, match=r"ckpt/3: cannot restore the train state \(ValueError: "
                     r".*\); was it written by another config or medjax version\?$") as e:
    ckpt.restore(target)
  assert "\n" not in str(e.value)
  assert _snapshot(run_copy) == before and not (run_copy.parent / "ckpt_unreadable").exists()
  assert not _warnings(caplog)


def test_no_checkpoint_restores_is_one_line_and_moves_nothing(run_copy):
  for step in (1, 2, 3):
    os.truncate(_largest_data_file(run_copy / str(step)), 10)
  before = _snapshot(run_copy)
  ckpt = checkpoint_lib.Checkpointer(run_copy, keep=10)
  with pytest.raises(MedjaxError, match=r"ckpt: no checkpoint restores \(step 3: its data cannot "
                     r"be read \(ValueError: OUT_OF_RANGE: .*step 1: .*nothing was moved") as e:
    ckpt.restore(_abstract(_state(0)))
  assert "\n" not in str(e.value)
  assert _snapshot(run_copy) == before and not (run_copy.parent / "ckpt_unreadable").exists()
  with pytest.raises(MedjaxError, match=r"ckpt/2: its data cannot be read \(ValueError: "):
    ckpt.restore(_abstract(_state(0)), step=2)  # an asked-for step: no fallback
  with pytest.raises(MedjaxError, match=r"ckpt: no checkpoint of step 7 \(steps: 1, 2, 3\)$"):
    ckpt.restore(_abstract(_state(0)), step=7)


def test_read_only_restore_keeps_tmp_folders_and_damaged_steps(run_copy, caplog):
  os.truncate(_largest_data_file(run_copy / "3"), 100)
  for name in TMP_NAMES:  # saves in progress of a live run
    (run_copy / name / "state").mkdir(parents=True)
  before = _snapshot(run_copy)
  ckpt = checkpoint_lib.Checkpointer(run_copy, read_only=True)
  assert ckpt.restore(_abstract(_state(0)))[2] == 2
  ckpt.close()
  assert _snapshot(run_copy) == before and all((run_copy / n).is_dir() for n in TMP_NAMES)
  [warning] = _warnings(caplog)
  assert warning.endswith("; left in place (read-only); using step 2")
  with pytest.raises(RuntimeError, match="read-only"):
    ckpt.save(9, _state(9), {})
  only_tmp = run_copy.parent / "only_tmp"
  (only_tmp / TMP_NAMES[0]).mkdir(parents=True)
  with pytest.raises(MedjaxError, match=r"only_tmp: no checkpoint to restore$"):
    checkpoint_lib.Checkpointer(only_tmp, read_only=True).restore(_abstract(_state(0)))
  assert (only_tmp / TMP_NAMES[0]).is_dir()
  writer = checkpoint_lib.Checkpointer(run_copy, every=1)  # the run itself does clean them up
  writer.save(6, _state(6), {})  # (which waits for that)
  writer.close()
  assert not any((run_copy / n).exists() for n in TMP_NAMES)


def test_unwritable_checkpoint_dir_and_bad_options_are_one_line(tmp_path):
  (tmp_path / "checkpoints").write_text("")  # a file where the folder should be
  with pytest.raises(MedjaxError, match=r"checkpoints: cannot write checkpoints there \("
                     r"(NotADirectoryError|FileExistsError): .*\); check the --workdir"):
    checkpoint_lib.Checkpointer(tmp_path / "checkpoints")
  assert (tmp_path / "checkpoints").read_text() == ""
  config = tiny_config()
  config.keep_checkpoints = 0
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(MedjaxError, match=r"^config.keep_checkpoints=0: keep at least 1"):
    trainer.train(config, tmp_path)
  config.keep_checkpoints, config.checkpoint_every_steps = 1, -5
  with pytest.raises(MedjaxError, match=r"^config.checkpoint_every_steps=-5: expected a posi"):
    trainer.train(config, tmp_path)
  assert (tmp_path / "config.json").read_text() == "{}"  # refused before anything is written


def test_aborted_io_tracebacks_are_dropped_others_kept(small_run, monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(checkpoint_lib, "_IO_FILTER_ON", False)
  checkpoint_lib.Checkpointer(small_run, read_only=True).close()

  class Unraisable:
    def __init__(self, exc, obj=None):
      self.exc_value, self.object = exc, obj
  sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
  other = Unraisable(RuntimeError("something else"))
  sys.unraisablehook(other)
  assert seen == [other]


# -- a real train state: the trainer's resume and the exporter's read path ---------------------

@pytest.fixture(scope="module")
def train_workdir(tmp_path_factory):
  """A workdir with checkpoints 2 and 3 of the tiny U-Net run (its initial state: no step runs)."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  config = tiny_config(total_steps=2, keep_checkpoints=5)
  workdir.mkdir()
  trainer.write_config(config, workdir)
  run = trainer.setup(config)
  data = make_dataset(config.data, "train", config.batch_size, seed=config.seed,
                      resolution=config.resolution, drop_remainder=True, blocks=True)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=5, every=1)
  for step in (2, 3):
    ckpt.save(step, run.state, {"data": [data.get_state()]})
  ckpt.close()
  return workdir, config


def test_train_resumes_past_a_truncated_newest_checkpoint(train_workdir, tmp_path, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(train_workdir[0], workdir)
  os.truncate(_largest_data_file(workdir / "checkpoints" / "3"), 100)
  summary = trainer.train(train_workdir[1], workdir)  # total_steps=2: resumes, nothing to run
  assert summary["step"] == 2 and summary["checkpoints"] == [2]
  [warning] = _warnings(caplog)
  assert "skipped step 3" in warning and "its data cannot be read" in warning
  assert (workdir / "checkpoints_unreadable" / "3" / "state").is_dir()


def test_export_reads_a_live_run_without_changing_it(train_workdir, tmp_path, caplog):
  workdir = tmp_path / "w"
  shutil.copytree(train_workdir[0], workdir)
  os.truncate(_largest_data_file(workdir / "checkpoints" / "3"), 100)
  for name in TMP_NAMES:
    (workdir / "checkpoints" / name / "state").mkdir(parents=True)
  before = _snapshot(workdir)
  sd = exporter.restore_pipeline(workdir)
  assert sd.params["unet"]
  assert _snapshot(workdir) == before
  assert all((workdir / "checkpoints" / n).is_dir() for n in TMP_NAMES)
  assert [w for w in _warnings(caplog) if "left in place (read-only); using step 2" in w]


@pytest.mark.slow  # one U-Net step compile in a subprocess (~40 s on 2 cores)
def test_nan_learning_rate_cli_exits_1_with_one_line_and_no_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "medjax.train", "--config=configs/cxr_unet.py",
         f"--workdir={tmp_path / 'w'}", "--config.learning_rate=nan",
         "--config.checkpoint_every_steps=1", "--config.total_steps=3", "--config.batch_size=2",
         "--config.data.phantoms.num=24", "--config.sample.num_per_prompt=0",
         "--config.progress_bar=False"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [ln for ln in proc.stderr.splitlines() if not re.match(r"[IW]\d{4} ", ln)]
  assert lines == [lines[0]] and lines[0].startswith(
      "error: non-finite loss or params in step 1; stopped without saving them. Last good "
      "checkpoint: none"), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not list((tmp_path / "w" / "checkpoints").iterdir())
