"""One persistent JAX compilation cache for the whole test session.

Most tests build the same tiny model, so they compile the same programs (train step, sampling
loop, VAE) again and again: each `trainer.setup` makes a new jitted step, which JAX's in-memory
cache cannot reuse. On disk it can: a second setup + step of `tiny_config()` went from ~45 s to
~11 s on 2 CPU cores. This process and the single-process children the tests start (they
inherit the environment) share one fresh directory, so no run depends on an earlier session.
Multi-process children leave it off (`launch_support.clean_env`).

Also starts the background jobs of tests/early_jobs.py that the selected tests will need.
"""
import os
import shutil
import tempfile

import jax

from tests import early_jobs

# JAX's names; a threshold of 0 also keeps the many small programs (a checkpoint save's slices).
_SETTINGS = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_state = {}


def pytest_configure(config):  # pylint: disable=unused-argument
  cache = tempfile.mkdtemp(prefix="medjax-test-jax-cache-")
  _state["dir"] = cache
  os.environ.update(_SETTINGS, JAX_COMPILATION_CACHE_DIR=cache)
  # This process may have imported jax already (it reads the variables at import).
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_finish(session):
  """Queues the early jobs of every fixture a selected test uses, in the order tests need them."""
  if session.config.option.collectonly:
    return
  for item in session.items:
    for fixture, jobs in getattr(getattr(item, "module", None), "EARLY_JOBS", {}).items():
      if fixture in getattr(item, "fixturenames", ()):
        early_jobs.queue(jobs)


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  early_jobs.stop()
  cache = _state.pop("dir", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
