"""Faults around output folders (issue 15): each ends in one error line and leaves earlier
outputs as they were. Workdirs that are files, empty, symlink loops, unwritable or in use; a
restore that fails after --config.allow_config_change; out of memory and a full disk in a fresh
run; evaluation pointed at a training run; exports into their own source, over folders that are
not exports, or interrupted.

Most run in-process and fail before a model is built; three subprocesses check what users see
(the exit status and the one stderr line).
"""
import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from medjax import checkpoint as checkpoint_lib
from medjax import exporter
from medjax import trainer
from medjax import workdir as workdir_lib
from medjax.errors import MedjaxError
from medjax.eval import protocols
from medjax.pipeline import StableDiffusion
from tests.train_support import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
  """Every file below `folder` with its bytes (folders as None): 'unchanged' means equal."""
  if not folder.exists():
    return {}
  return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(folder.rglob("*"))}


def one_line(error) -> str:
  text = str(error.value if hasattr(error, "value") else error)
  assert "\n" not in text and "Traceback" not in text, text
  return text


def fake_training_workdir(path: Path) -> Path:
  """What `is_training_workdir` recognises, with a file that must survive."""
  (path / "checkpoints" / "1").mkdir(parents=True)
  (path / "checkpoints" / "1" / "state").write_text("weights")
  (path / "config.json").write_text(tiny_config().to_json())
  return path


@pytest.fixture(scope="module")
def base_run():
  """One built tiny model (`trainer.setup`) for the tests that need the state's shapes."""
  return trainer.setup(tiny_config())


def refuse_new_entries(folder: Path, monkeypatch) -> None:
  """`folder` refuses new entries: chmod 0o555, and where permissions do not bind (root, as in
  CI), os.open/os.mkdir of entries inside it fail with EACCES as the kernel would for others."""
  folder.chmod(0o555)
  try:
    (folder / ".try").touch()
  except PermissionError:
    return
  (folder / ".try").unlink()
  real_open, real_mkdir = os.open, os.mkdir

  def denied(path):
    if Path(path).parent == folder:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

  def guarded_open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT:
      denied(path)
    return real_open(path, flags, *args, **kwargs)

  def guarded_mkdir(path, *args, **kwargs):
    denied(path)
    return real_mkdir(path, *args, **kwargs)
  monkeypatch.setattr(os, "open", guarded_open)
  monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def run_entry(module: str, args: list[str], fsize_limit: int | None = None):
  """`python -m <module> <args>` (optionally under RLIMIT_FSIZE): (exit status, stderr)."""
  code = textwrap.dedent(f"""
      import resource, runpy, sys
      if {fsize_limit!r} is not None:  # writes past it fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit!r}, resource.RLIM_INFINITY))
      sys.argv = [{module!r}] + {args!r}
      runpy.run_module({module!r}, run_name="__main__")
      """)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  return proc.returncode, proc.stderr


def error_lines(stderr: str) -> list[str]:
  assert "Traceback" not in stderr, stderr[-3000:]
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- the workdir itself ----------------------------------------------------------------------

def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "run"
  path.write_text("notes")
  with pytest.raises(MedjaxError) as e:
    trainer.train(tiny_config(), path)
  assert "exists and is not a directory" in one_line(e)
  assert path.read_text() == "notes"


def test_workdir_inside_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(MedjaxError, match="is a file, not a directory") as e:
    trainer.train(tiny_config(), tmp_path / "file" / "run")
  one_line(e)


def test_empty_workdir_is_not_the_current_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(MedjaxError, match="--workdir is empty") as e:
    trainer.train(tiny_config(), "")
  one_line(e)
  assert not list(tmp_path.iterdir())


def test_workdir_symlink_loop_and_dangling_link(tmp_path):
  os.symlink(tmp_path / "b", tmp_path / "a")
  os.symlink(tmp_path / "a", tmp_path / "b")
  with pytest.raises(MedjaxError, match="Too many levels of symbolic links") as e:
    trainer.train(tiny_config(), tmp_path / "a")
  one_line(e)
  os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
  with pytest.raises(MedjaxError, match="symbolic link to nothing"):
    trainer.train(tiny_config(), tmp_path / "dangling")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "dangling"]


def test_unwritable_workdir_is_refused_before_the_model(tmp_path, monkeypatch):
  folder = tmp_path / "ro"
  folder.mkdir()
  refuse_new_entries(folder, monkeypatch)
  monkeypatch.setattr(trainer, "setup", lambda *a, **k: pytest.fail("model built"))
  for workdir in (folder, folder / "run"):  # the folder itself, or one to be made inside it
    with pytest.raises(MedjaxError, match="cannot write a file .Permission denied") as e:
      trainer.train(tiny_config(), workdir)
    one_line(e)
  assert not list(folder.iterdir())


def test_workdir_on_a_filesystem_that_refuses_files():
  """sysfs refuses new files to everyone (root too): a real kernel refusal, no simulation."""
  if not Path("/sys/kernel").is_dir():
    pytest.skip("no sysfs")
  with pytest.raises(MedjaxError, match="cannot write a file") as e:
    trainer.train(tiny_config(), "/sys/kernel/medjax-run")
  one_line(e)


def test_second_run_on_a_locked_workdir_names_the_owner(tmp_path):
  workdir = tmp_path / "run"
  with workdir_lib.take(workdir, "medjax.train"):  # another run (flock: per open file)
    before = snapshot(workdir)
    for start in (lambda: trainer.train(tiny_config(), workdir),
                  lambda: protocols.run_protocol(protocols.base_config(), workdir)):
      with pytest.raises(MedjaxError, match="is in use by pid") as e:
        start()
      assert f"pid {os.getpid()} on host {socket.gethostname()}" in one_line(e)
    assert snapshot(workdir) == before
  assert not (workdir / workdir_lib.LOCK_NAME).exists()  # released and removed


def test_a_dead_owners_lock_file_does_not_block(tmp_path):
  (tmp_path / workdir_lib.LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "gone"}))
  with workdir_lib.take(tmp_path, "medjax.train") as held:
    assert held.created is False
    owner = json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid()


# -- runs that fail once the model exists ------------------------------------------------------

def test_allow_config_change_with_an_incompatible_config_changes_nothing(base_run, tmp_path):
  """The restore fails (the checkpoint has no EMA params): config.json keeps the run's config,
  so the original command still resumes and exports."""
  config, workdir = tiny_config(), tmp_path / "run"
  with checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=3) as ckpt:
    ckpt.save(1, base_run.state, {"data": [{}]}, force=True)
  trainer.write_config(config, workdir)
  before = snapshot(workdir)
  changed = tiny_config(ema_decay=0.5, allow_config_change=True, learning_rate=1e-3)
  with pytest.raises(MedjaxError) as e:
    trainer.train(changed, workdir)
  one_line(e)
  assert snapshot(workdir) == before
  trainer.check_workdir(config, workdir)  # the original command is not refused
  assert exporter.is_training_workdir(workdir)


def test_out_of_memory_in_the_step_is_one_line_naming_the_knobs(base_run, tmp_path,
                                                                monkeypatch):
  """The jitted step raises what XLA raises on an exhausted device (jax.errors.JaxRuntimeError,
  RESOURCE_EXHAUSTED), monkeypatched: the machine's real memory is shared. The run was fresh,
  so it leaves no config.json, checkpoints/ or tensorboard/ behind."""
  def step(*args):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.")
  monkeypatch.setattr(trainer, "setup",
                      lambda config, mesh=None: dataclasses.replace(base_run, step=step))
  workdir = tmp_path / "run"
  (tmp_path / "keep").mkdir()  # a pre-existing workdir keeps what it had
  for target, after in ((workdir, None), (tmp_path / "keep", ["notes"])):
    if after:
      (target / "notes").write_text("mine")
    with pytest.raises(MedjaxError) as e:
      trainer.train(tiny_config(), target)
    text = one_line(e)
    assert "out of device memory" in text and "RESOURCE_EXHAUSTED" in text
    for knob in ("config.batch_size=2", "config.remat", "config.mixed_precision"):
      assert knob in text
    assert (sorted(p.name for p in target.iterdir()) if target.exists() else None) == after


def test_disk_full_in_a_fresh_run_is_one_line_and_leaves_nothing(tmp_path):
  """Disk full simulated without root: the train subprocess runs under RLIMIT_FSIZE (2,000
  bytes), so the write of config.json (3 kB, after the model is built and checkpoints/ made)
  fails with EFBIG, as ENOSPC would fail it."""
  workdir = tmp_path / "run"
  status, stderr = run_entry("medjax.train", [
      "--config=configs/cxr_unet.py", f"--workdir={workdir}", "--config.total_steps=2",
      "--config.batch_size=2", "--config.data.phantoms.num=24",
      "--config.sample.num_per_prompt=0", "--config.progress_bar=False"], fsize_limit=2000)
  assert status == 1
  assert error_lines(stderr) == [f"error: {workdir}/config.json: File too large"]
  assert not workdir.exists()


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_stops_the_loop(tmp_path):
  """RLIMIT_FSIZE (1 MB) lets the small files through and fails orbax's async write of the
  first checkpoint (5 MB); the loop stops at the next save, orbax's threads are closed (no
  tracebacks at exit), and the fresh run leaves nothing."""
  workdir = tmp_path / "run"
  status, stderr = run_entry("medjax.train", [
      "--config=configs/cxr_unet.py", f"--workdir={workdir}", "--config.total_steps=12",
      "--config.checkpoint_every_steps=4", "--config.batch_size=2",
      "--config.data.phantoms.num=24", "--config.sample.num_per_prompt=0",
      "--config.progress_bar=False"], fsize_limit=1_000_000)
  assert status == 1
  assert error_lines(stderr) == [
      f"error: {workdir}/checkpoints: File too large (writing a checkpoint)"]
  assert not workdir.exists()


# -- evaluation --------------------------------------------------------------------------------

def test_evaluate_into_a_training_workdir_is_refused(tmp_path):
  workdir = fake_training_workdir(tmp_path / "run")
  before = snapshot(workdir)
  with pytest.raises(MedjaxError, match="is a training workdir") as e:
    protocols.run_protocol(protocols.base_config(), workdir)
  one_line(e)
  assert snapshot(workdir) == before


def test_evaluate_on_an_unwritable_workdir(tmp_path, monkeypatch):
  refuse_new_entries(tmp_path, monkeypatch)
  with pytest.raises(MedjaxError, match="cannot write a file") as e:
    protocols.run_protocol(protocols.base_config(), tmp_path / "eval")
  one_line(e)


# -- export ------------------------------------------------------------------------------------

def test_export_into_its_own_source_is_refused_and_deletes_nothing(tmp_path):
  """`python -m medjax.export --from=W --to=W --overwrite` used to delete the training run."""
  workdir = fake_training_workdir(tmp_path / "run")
  before = snapshot(workdir)
  status, stderr = run_entry("medjax.export", [f"--from={workdir}", f"--to={workdir}",
                                               "--overwrite"])
  assert status == 1
  assert error_lines(stderr) == [f"error: --to={workdir} is --from={workdir}; export to "
                                 "another directory"]
  assert snapshot(workdir) == before


def test_export_target_inside_containing_or_linked_to_the_source(tmp_path):
  src = fake_training_workdir(tmp_path / "run")
  os.symlink(src, tmp_path / "link")
  for to, word in ((src / "export", "is inside"), (tmp_path, "contains"),
                   (tmp_path / "link", "is")):
    with pytest.raises(MedjaxError, match=f"{word} --from") as e:
      exporter.check_target(to, str(src), overwrite=True)
    one_line(e)


def test_export_overwrite_replaces_only_diffusers_exports(tmp_path):
  training = fake_training_workdir(tmp_path / "run")
  other = tmp_path / "photos"
  other.mkdir()
  (other / "a.png").write_text("x")
  (tmp_path / "file").write_text("x")
  for target, words in ((training, "a training workdir"), (other, "no model_index.json"),
                        (tmp_path / "file", "no model_index.json")):
    before = snapshot(target) if target.is_dir() else target.read_text()
    with pytest.raises(MedjaxError, match=words) as e:
      exporter.check_target(target, "", overwrite=True)
    one_line(e)
    assert (snapshot(target) if target.is_dir() else target.read_text()) == before


def test_export_interrupted_or_into_a_missing_parent(tmp_path, monkeypatch):
  """Ctrl-C while the written folder is checked: the old export stays, no staging folder is
  left. A --to whose parent folders do not exist yet gets them (like a workdir)."""
  sd = StableDiffusion.embedded(seed=0)
  out = tmp_path / "export"
  out.mkdir()
  (out / "model_index.json").write_text("{}")
  before = snapshot(tmp_path)

  def interrupt(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(exporter, "verify_reload", interrupt)
  with pytest.raises(KeyboardInterrupt):
    exporter.export(sd, out, overwrite=True)
  assert snapshot(tmp_path) == before
  monkeypatch.setattr(exporter, "verify_reload", lambda *args: 0.0)
  exporter.export(sd, tmp_path / "new" / "deeper" / "export")
  assert (tmp_path / "new" / "deeper" / "export" / "model_index.json").is_file()
  exporter.export(sd, out, overwrite=True)  # replaces the old export, nothing left beside it
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "new"]
  assert (out / "unet").is_dir()
