"""Workdir paths through etils.epath: gs:// stays a URL end to end (paths, atomic writes, run
config, the orbax manager), tested against an in-memory filesystem registered as fsspec's gs://
(no network, no gcsfs); local paths behave as before."""
import importlib
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from medjax import atomic
from medjax import checkpoint
from medjax import paths
from medjax import preemption
from medjax.errors import MedjaxError


class FakeGCS(MemoryFileSystem):
  """fsspec's memory filesystem answering for gs:// (what epath uses without TensorFlow)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # pylint: disable=unused-argument
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    path = path.strip("/")
    return "/" + path if path else ""


@pytest.fixture
def fake_gcs(monkeypatch):
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("epath routes gs:// to TensorFlow's gfile when TensorFlow is installed")
  registry = importlib.import_module("fsspec.registry")._registry
  monkeypatch.setitem(registry, "gs", FakeGCS)
  monkeypatch.setitem(registry, "gcs", FakeGCS)
  monkeypatch.setattr(FakeGCS, "store", {})
  monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield FakeGCS.store
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  p = paths.workdir_path("gs://bucket/run")
  assert isinstance(p, epath.Path) and str(p) == "gs://bucket/run"
  assert str(p / "checkpoints") == "gs://bucket/run/checkpoints"
  # What pathlib makes of a URL is repaired, not written to a local ./gs:/ folder.
  assert str(paths.workdir_path(pathlib.Path("gs://bucket/run"))) == "gs://bucket/run"
  assert paths.is_url(pathlib.Path("s3://b/x")) and paths.is_url("gs://b")
  assert not paths.is_url("/data/gs:/b") and not paths.is_url("run")
  monkeypatch.chdir(tmp_path)
  assert str(paths.workdir_path("run")) == str(tmp_path / "run")
  assert str(paths.workdir_path(pathlib.Path("a") / "b")) == str(tmp_path / "a" / "b")
  assert str(paths.workdir_path("~/x")) == os.path.expanduser("~/x")
  with pytest.raises(MedjaxError, match=r"memory://x: unsupported URL scheme memory://"):
    paths.workdir_path("memory://x")


def test_local_atomic_writes_as_before(tmp_path):
  target = tmp_path / "sub" / "out.txt"
  assert atomic.write_text(target, "one") == target and target.read_text() == "one"
  assert oct(target.stat().st_mode & 0o777) == oct(0o644)
  with pytest.raises(RuntimeError):
    with atomic.atomic_path(target) as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash")
  assert target.read_text() == "one"
  assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_writes_to_a_url_upload_complete_files(fake_gcs):
  out = atomic.write_text("gs://bucket/run/config.json", '{"a": 1}')
  assert isinstance(out, epath.Path) and str(out) == "gs://bucket/run/config.json"
  assert out.read_text() == '{"a": 1}'
  assert out.parent.exists() and not (pathlib.Path.cwd() / "gs:").exists()
  with atomic.atomic_path(pathlib.Path("gs://bucket/run") / "grid.bin") as tmp:
    assert not paths.is_url(tmp)  # writers (PIL, torch, open) get a local file
    tmp.write_bytes(b"\x00\x01")
  assert epath.Path("gs://bucket/run/grid.bin").read_bytes() == b"\x00\x01"
  with pytest.raises(RuntimeError):
    with atomic.atomic_path("gs://bucket/run/config.json") as tmp:
      tmp.write_text("half")
      raise RuntimeError("crash")
  assert out.read_text() == '{"a": 1}'
  atomic.write_text(out, '{"a": 2}')  # replaces
  assert out.read_text() == '{"a": 2}'
  assert sorted(fake_gcs) == ["/bucket/run/config.json", "/bucket/run/grid.bin"]  # no temps


def test_run_config_and_orbax_get_the_url(fake_gcs, monkeypatch):
  atomic.write_text("gs://bucket/run/config.json", '{"seed": 3}\n')
  assert checkpoint.read_run_config("gs://bucket/run") == {"seed": 3}
  assert checkpoint.read_run_config(pathlib.Path("gs://bucket/run")) == {"seed": 3}
  assert checkpoint.read_run_config("gs://bucket/other") is None
  # Orbax's own gs:// support needs google-cloud-storage and a network: record what it gets.
  seen = []

  class Manager:
    def __init__(self, directory, **kwargs):  # pylint: disable=unused-argument
      seen.append(directory)

  monkeypatch.setattr(ocp, "CheckpointManager", Manager)
  ckpt = checkpoint.Checkpointer(pathlib.Path("gs://bucket/run") / "checkpoints")
  assert isinstance(seen[0], epath.Path) and str(seen[0]) == "gs://bucket/run/checkpoints"
  assert str(ckpt.directory) == "gs://bucket/run/checkpoints"


def test_local_checkpointer_async_save_restore_and_no_preemption(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  fresh = preemption.SigtermWatch()
  monkeypatch.setattr(fresh, "install", lambda *a: None)  # keep pytest's own signal handling
  monkeypatch.setattr(preemption, "WATCH", fresh)
  ckpt = checkpoint.Checkpointer(pathlib.Path("ckpt"), keep=2, every=2, async_save=True)
  assert str(ckpt.directory) == str(tmp_path / "ckpt")
  state = {"w": jax.numpy.arange(4.0)}
  assert not ckpt.save(1, state, {"i": 1})
  assert ckpt.save(2, state, {"i": 2})
  assert not ckpt.save(2, state, {"i": 2}, force=True)  # already there
  ckpt.wait()
  restored, extra, step = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert (extra, step, ckpt.all_steps()) == ({"i": 2}, 2, [2])
  assert ckpt.should_stop(3) is False
  ckpt.close()


def test_train_outputs_to_a_url(fake_gcs):
  """What process 0 writes besides checkpoints (embeddings, summary, class images) keeps a
  gs:// workdir a URL; the class images read back through epath."""
  # pylint: disable=import-outside-toplevel,protected-access
  from medjax import batches
  from medjax import run_outputs
  workdir = paths.workdir_path("gs://bucket/run")
  written = run_outputs.write_embeddings(np.ones((4, 8), np.float32), ["<a>", "<b>"], 2,
                                         workdir, step=3)
  assert [str(p) for p in written] == [
      f"gs://bucket/run/embeddings/{kind}/{name}.safetensors"
      for name in ("a", "b") for kind in ("diffusers", "a1111")]
  run_outputs.write_summary(workdir, {"step": 3})
  images = np.full((2, 8, 8, 3), 255, np.uint8)
  batches._write_class_images(images, workdir / "class_images", workdir,
                              {"synthetic": "true"}, seed=0)
  files = batches._image_files(workdir / "class_images")
  assert [f.name for f in files] == ["sample_0000.png", "sample_0001.png"]
  np.testing.assert_array_equal(batches._read_rgb(files[0]), np.ones((8, 8, 3)))
  assert sorted(fake_gcs) == sorted(
      ["/bucket/run/summary.json", "/bucket/run/class_images/sample_0000.png",
       "/bucket/run/class_images/sample_0001.png"]
      + [f"/bucket/run/embeddings/{kind}/{name}.safetensors"
         for name in ("a", "b") for kind in ("diffusers", "a1111")])
  assert not pathlib.Path("gs:").exists()  # nothing landed in a local ./gs:/ folder
