"""`python -m tests.every_process_caches MODULE [ARGS]`: `python -m MODULE [ARGS]` with JAX's
persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) written by every process of a
multi-process run, for tests that run one multi-process command several times.

JAX writes cache entries from process 0 only (against write contention on a shared network
filesystem). On CPU the processes' cache keys differ (compile options and topology fingerprint),
so with that rule process 1 finds nothing in a repeated run while process 0 loads every program
at once and waits in its first collective for process 1's compiles, past gloo's fixed 30 s
timeout on a busy machine (tests/launch_support.py). Here each process writes its own entries
into its own folder under `JAX_COMPILATION_CACHE_DIR` (`process_<JAX_PROCESS_ID>`), so in a
repeated run every process loads its programs.

This replaces one private function of `jax._src.compiler`. Where that function is not the one
this was written against (another JAX version), the cache is switched off instead: the command
then compiles as without a cache, which is always safe.
"""
import inspect
import os
import runpy
import sys
import warnings

_PARAMS = ["cache_key", "compile_time_secs", "module_name", "backend", "executable",
           "host_callbacks"]


def _write_every_process() -> bool:
  """Patches JAX's cache write; False (and the cache off) where JAX is not as expected."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    from jax._src import compiler  # pylint: disable=import-outside-toplevel
    ok = (list(inspect.signature(compiler._cache_write).parameters) == _PARAMS  # pylint: disable=protected-access
          and callable(getattr(compilation_cache, "put_executable_and_time", None)))
  except (ImportError, AttributeError, TypeError, ValueError):
    ok = False
  if not ok:
    jax.config.update("jax_enable_compilation_cache", False)
    print("tests/every_process_caches.py: unexpected JAX internals, compilation cache off",
          file=sys.stderr, flush=True)
    return False

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                  host_callbacks):
    # JAX's own checks, less "process 0 only".
    if host_callbacks:
      return
    if compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
      return
    try:
      compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                int(compile_time_secs))
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"persistent cache entry for {module_name!r} not written: {e!r}",
                    stacklevel=2)

  compiler._cache_write = cache_write  # pylint: disable=protected-access
  # One folder per process: no two processes ever write or read one file at once.
  base, pid = os.environ.get("JAX_COMPILATION_CACHE_DIR"), os.environ.get("JAX_PROCESS_ID")
  if base and pid:
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, f"process_{pid}"))
  return True


def main() -> None:
  if len(sys.argv) < 2:
    sys.exit("usage: python -m tests.every_process_caches MODULE [ARGS]")
  _write_every_process()
  module = sys.argv[1]
  sys.argv = [sys.argv[0], *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
