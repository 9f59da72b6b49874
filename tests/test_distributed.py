"""Multi-process JAX: the environment -> jax.distributed.initialize arguments (no real start), and
real 2-process x 2-CPU-device runs through launch/local.py: a global mesh, a sharded array, a
jitted sum, an orbax save/restore, and preemption (SIGTERM to one process: all save one step)."""
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from medjax import distributed
from medjax.errors import MedjaxError
from tests import launch_support

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

GENERIC = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "2"}


def _plan(env):
  return distributed.plan_from_env(env, tpu_vm=False)


# -- the environment -> initialize() -------------------------------------------------------------

def test_one_process_environments_start_nothing():
  assert _plan({}) is None
  assert _plan({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
  assert _plan({"TPU_WORKER_HOSTNAMES": "one-host"}) is None
  assert _plan({"MEDJAX_DISTRIBUTED": "0"}) is None
  assert _plan({"OMPI_MCA_orte_hnp_uri": "x"}) is None  # as before: only with a coordinator


def test_generic_variables_are_passed_explicitly():
  plan = _plan(GENERIC)
  assert plan.source == "generic"
  assert plan.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 2, "cluster_detection_method": "deactivate"}
  plan = _plan({**GENERIC, "JAX_LOCAL_DEVICE_IDS": "0, 3", "SLURM_NTASKS": "8"})
  assert plan.source == "generic" and plan.kwargs["local_device_ids"] == [0, 3]
  assert _plan({**GENERIC, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}).kwargs[
      "num_processes"] == 1


def test_cluster_environments_let_jax_detect_the_rest():
  assert _plan({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) == distributed.Plan("slurm", {})
  assert _plan({"TPU_WORKER_HOSTNAMES": "a,b"}).source == "tpu"
  assert _plan({"MEDJAX_DISTRIBUTED": "1", "JAX_LOCAL_DEVICE_IDS": "1"}).kwargs == {
      "local_device_ids": [1]}
  # A coordinator alone is fine where the cluster gives count and id (srun, tpu_pod.sh).
  coord = {"JAX_COORDINATOR_ADDRESS": "h:1"}
  assert _plan({**coord, "SLURM_NTASKS": "2"}) == distributed.Plan(
      "slurm", {"coordinator_address": "h:1"})
  assert _plan({**coord, "MEDJAX_DISTRIBUTED": "1"}).kwargs == {"coordinator_address": "h:1"}
  assert distributed.plan_from_env(coord, tpu_vm=True).source == "cloud tpu vm"


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1"},
     "JAX_COORDINATOR_ADDRESS=h:1 is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "JAX_PROCESS_ID is not"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not"),
    ({**GENERIC, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "expected host:port"),
    ({**GENERIC, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two': expected an integer"),
    ({**GENERIC, "JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0: expected a positive"),
    ({**GENERIC, "JAX_PROCESS_ID": "4"}, "expected 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES=4"),
    ({**GENERIC, "JAX_LOCAL_DEVICE_IDS": "0;1"}, "comma-separated integers"),
    ({**GENERIC, "JAX_LOCAL_DEVICE_IDS": "1,1"}, "distinct non-negative"),
    ({"SLURM_NTASKS": "x"}, "SLURM_NTASKS='x': expected an integer"),
])
def test_bad_environments_are_one_line_errors(env, message):
  with pytest.raises(MedjaxError, match="^[^\n]*$") as e:
    _plan(env)
  assert message in str(e.value)


def test_maybe_initialize_passes_the_plan_selects_gloo_and_runs_once(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed, "_state", {"done": False})
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  before = jax.config.jax_cpu_collectives_implementation
  try:
    jax.config.update(distributed.CPU_COLLECTIVES, None)
    assert distributed.maybe_initialize_distributed(env=GENERIC)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    assert distributed.maybe_initialize_distributed(env=GENERIC) is False  # already done
  finally:
    jax.config.update(distributed.CPU_COLLECTIVES, before)
  assert calls == [_plan(GENERIC).kwargs]
  # A collectives implementation the user chose stays.
  monkeypatch.setattr(distributed, "_state", {"done": False})
  jax.config.update(distributed.CPU_COLLECTIVES, None)
  try:
    distributed.maybe_initialize_distributed(
        env={**GENERIC, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi"})
    assert jax.config.jax_cpu_collectives_implementation is None
  finally:
    jax.config.update(distributed.CPU_COLLECTIVES, before)


def test_coordinator_alone_fails_before_jax_does(monkeypatch):
  monkeypatch.setattr(distributed, "_state", {"done": False})
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("initialized"))
  with pytest.raises(MedjaxError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"):
    distributed.maybe_initialize_distributed(env={"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert distributed.maybe_initialize_distributed(env={}) is False


def test_trainer_starts_distributed_before_anything_uses_a_device(monkeypatch, tmp_path):
  """The `sharding.maybe_initialize_distributed` alias is gone: the trainer calls
  `distributed.maybe_initialize_distributed` itself, first."""
  from medjax import sharding  # pylint: disable=import-outside-toplevel
  from medjax import trainer  # pylint: disable=import-outside-toplevel
  from tests.train_support import tiny_config  # pylint: disable=import-outside-toplevel
  assert not hasattr(sharding, "maybe_initialize_distributed")
  calls = []

  def stop(*args, **kwargs):
    calls.append("setup")
    raise MedjaxError("stop here")

  monkeypatch.setattr(distributed, "maybe_initialize_distributed", lambda: calls.append("init"))
  monkeypatch.setattr(trainer, "setup", stop)
  with pytest.raises(MedjaxError, match="stop here"):
    trainer.train(tiny_config(), tmp_path / "w")
  assert calls == ["init", "setup"]
  assert not (tmp_path / "w").exists()  # nothing written before the model is built


# -- real processes ------------------------------------------------------------------------------

def _env():
  return launch_support.clean_env(num_processes=2)


GLOBAL_ARRAY = textwrap.dedent("""
    import sys
    from medjax import distributed
    assert distributed.maybe_initialize_distributed()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from medjax import checkpoint, sharding
    pid = jax.process_index()
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    mesh = sharding.make_mesh(2, 2)
    assert mesh.devices.size == 4
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    local = np.arange(6, dtype=np.float32).reshape(2, 3) + 6 * pid  # rows 2*pid, 2*pid + 1
    x = jax.make_array_from_process_local_data(rows, local)
    assert x.shape == (4, 3) and not x.is_fully_addressable
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(x)
    print(f"sum {float(total)}", flush=True)
    ckpt = checkpoint.Checkpointer(sys.argv[1], every=1, async_save=True)
    assert ckpt.save(3, {"x": x}, {"note": "hi"})
    ckpt.wait()
    abstract = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)}
    state, extra, step = ckpt.restore(abstract)
    ckpt.close()
    y = state["x"]
    same = all(np.array_equal(a.data, b.data) for a, b in zip(
        sorted(x.addressable_shards, key=lambda s: s.device.id),
        sorted(y.addressable_shards, key=lambda s: s.device.id)))
    print(f"restored step={step} extra={extra} same={same} "
          f"sum={float(jax.jit(jnp.sum)(y))}", flush=True)
""")


def test_two_processes_share_a_mesh_a_sum_and_a_checkpoint(tmp_path):
  script = tmp_path / "global_array.py"
  script.write_text(GLOBAL_ARRAY)
  out = io.StringIO()
  rc = local.launch([sys.executable, str(script), str(tmp_path / "ckpt")], 2, 2, env=_env(),
                    out=out, grace_s=5)
  text = out.getvalue()
  assert rc == 0, text[-4000:]
  total = float(sum(range(12)))
  for p in ("[p0]", "[p1]"):
    assert f"{p} sum {total}" in text, text[-4000:]
    assert f"{p} restored step=3 extra={{'note': 'hi'}} same=True sum={total}" in text
  assert (tmp_path / "ckpt" / "3" / "state").is_dir()
  assert not [p for p in (tmp_path / "ckpt").iterdir() if "tmp" in p.name]


PREEMPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from medjax import distributed
    distributed.maybe_initialize_distributed()
    import jax, numpy as np
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from medjax import checkpoint, sharding
    workdir = Path(sys.argv[1])
    mesh = sharding.make_mesh(-1, 1)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    x = jax.make_array_from_process_local_data(
        rows, np.zeros((jax.local_device_count(), 2), np.float32))
    step_fn = jax.jit(lambda x: x + 1, out_shardings=rows)
    spin = jax.jit(lambda n: lax.fori_loop(0, n, lambda i, v: v * 0.999 + 1.0, 0.0))
    spin(1).block_until_ready()
    ckpt = checkpoint.Checkpointer(workdir / "ckpt", every=10**6, async_save=True)
    grace = os.environ.get("GRACE_S")
    ckpt.watch_preemption(grace_s=float(grace) if grace else None)
    step = 0
    while step < 3000:  # ~60 s unless preempted
      x = step_fn(x)
      step += 1
      if step == 5:
        (workdir / f"pid{jax.process_index()}").write_text(str(os.getpid()))
        if os.environ.get("STUCK"):
          print("stuck", flush=True)
          for _ in range(4):  # the main thread waits in XLA (~15 s a call) as in a hung collective
            spin(2_000_000_000).block_until_ready()
      if ckpt.should_stop(step):
        ckpt.save(step, {"x": x}, {"step": step}, force=True)
        ckpt.close()
        print(f"preempted at step {step}", flush=True)
        sys.exit(0)
      time.sleep(0.02)
    print("never preempted", flush=True)
    sys.exit(1)
""")


def _start(tmp_path, num_processes, **env):
  """The loop as `num_processes` processes through the launcher, or one plain process (0)."""
  script = tmp_path / "preempt.py"
  script.write_text(PREEMPT)
  cmd = [sys.executable, str(script), str(tmp_path)]
  if num_processes:
    cmd = [sys.executable, str(ROOT / "launch" / "local.py"), f"--num_processes={num_processes}",
           "--devices_per_process=2", "--grace_s=5", "--", *cmd]
  return subprocess.Popen(cmd, env={**_env(), **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _pids(tmp_path, proc, n, timeout=60):
  end = time.time() + timeout
  while time.time() < end:
    files = [tmp_path / f"pid{i}" for i in range(n)]
    if all(f.exists() and f.read_text() for f in files):
      return [int(f.read_text()) for f in files]
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    time.sleep(0.1)
  proc.kill()
  raise AssertionError("the processes did not reach step 5")


def _preempted_steps(out: str, n: int) -> set:
  steps = set()
  for i in range(n):
    lines = [l for l in out.splitlines() if l.startswith(f"[p{i}] preempted at step ")]
    assert len(lines) == 1, out[-4000:]
    steps.add(int(lines[0].rsplit(" ", 1)[1]))
  return steps


@pytest.mark.parametrize("target", ["one child", "the launcher"])
def test_sigterm_all_processes_save_the_same_step_and_exit_0(tmp_path, target):
  proc = _start(tmp_path, 2)
  pids = _pids(tmp_path, proc, 2)
  os.kill(pids[1] if target == "one child" else proc.pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-4000:]
  (step,) = _preempted_steps(out, 2)
  assert step > 5
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [str(step)]
  assert "never preempted" not in out


def test_one_process_sigterm_saves_and_exits_0(tmp_path):
  proc = _start(tmp_path, 0)
  (pid,) = _pids(tmp_path, proc, 1)
  os.kill(pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out[-3000:]
  (step,) = [int(l.rsplit(" ", 1)[1]) for l in out.splitlines() if "preempted at step" in l]
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [str(step)]


def _read_until(proc, text: str) -> str:
  lines = []
  while not lines or text not in lines[-1]:
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)[-3000:]  # EOF first
  return "".join(lines)


def test_a_stuck_process_ends_on_the_second_sigterm(tmp_path):
  proc = _start(tmp_path, 0, STUCK="1")
  (pid,) = _pids(tmp_path, proc, 1)
  _read_until(proc, "stuck")
  os.kill(pid, signal.SIGTERM)
  _read_until(proc, "SIGTERM received")  # seen at once, by the watcher thread
  t0 = time.time()
  os.kill(pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert time.time() - t0 < 5
  assert proc.returncode == -signal.SIGTERM, out[-3000:]


def test_a_stuck_process_ends_after_the_grace_period(tmp_path):
  proc = _start(tmp_path, 0, STUCK="1", GRACE_S="1")
  (pid,) = _pids(tmp_path, proc, 1)
  _read_until(proc, "stuck")
  t0 = time.time()
  os.kill(pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert time.time() - t0 < 8
  assert proc.returncode == -signal.SIGTERM and "no step within 1 s of SIGTERM" in out, out
