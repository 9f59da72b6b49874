"""Starting multi-process JAX (`jax.distributed`) from what the environment says.

Three ways to describe a multi-process run, tried in this order:
- generic (any cluster, and `launch/local.py`): `JAX_COORDINATOR_ADDRESS=host:port`,
  `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i` (all three), optionally `JAX_LOCAL_DEVICE_IDS=0,1`.
  They are passed to `jax.distributed.initialize` explicitly, with cluster auto-detection off, so
  a SLURM or TPU environment around the run cannot change them.
- SLURM (`SLURM_NTASKS` > 1, started by `srun`): JAX reads the rest from SLURM's variables;
  `JAX_COORDINATOR_ADDRESS` alone may override the coordinator.
- Cloud TPU pod slices (`TPU_WORKER_HOSTNAMES` with several hosts) and `MEDJAX_DISTRIBUTED=1`
  (e.g. TPU VMs, or any cluster JAX detects itself): `jax.distributed.initialize()` as is.
`JAX_COORDINATOR_ADDRESS` without the count and id is an error, except where JAX finds them
itself (SLURM, Open MPI, Cloud TPU VMs, `MEDJAX_DISTRIBUTED=1`). One process with none of these
does nothing.

Once running, every process runs the same program over the global mesh; `medjax.hosts` has the
helpers that move host data in and out of it and let process 0 alone write files.
"""
import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging

from medjax.errors import MedjaxError

COORDINATOR, NUM_PROCESSES, PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
GENERIC = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
CPU_COLLECTIVES = "jax_cpu_collectives_implementation"

_state = {"done": False}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to start: `source` names the environment found, `kwargs` go to `initialize`."""
  source: str
  kwargs: dict


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise MedjaxError(f"{name}={env[name]!r}: expected an integer") from None


def _local_device_ids(env: Mapping[str, str]) -> list[int] | None:
  text = env.get(LOCAL_DEVICE_IDS, "").strip()
  if not text:
    return None
  try:
    ids = [int(x) for x in text.split(",")]
  except ValueError:
    raise MedjaxError(f"{LOCAL_DEVICE_IDS}={text!r}: expected comma-separated integers "
                      "such as 0,1") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise MedjaxError(f"{LOCAL_DEVICE_IDS}={text!r}: expected distinct non-negative integers")
  return ids


def _generic(env: Mapping[str, str], detected: str | None) -> Plan | None:
  given = {name: env.get(name, "").strip() for name in GENERIC}
  if not any(given.values()):
    return None
  missing = [name for name, value in given.items() if not value]
  if missing == [NUM_PROCESSES, PROCESS_ID] and detected:
    # e.g. srun, or tpu_pod.sh on TPU VMs: JAX takes the count and rank from the cluster.
    return Plan(detected, {"coordinator_address": given[COORDINATOR]})
  if missing:
    have = ", ".join(f"{n}={given[n]}" for n in GENERIC if given[n])
    verb = "is" if len(missing) == 1 else "are"
    raise MedjaxError(f"multi-process launch: {have} is set but {' and '.join(missing)} {verb} "
                      f"not; set all of {', '.join(GENERIC)} (launch/local.py does this on one "
                      "machine)")
  address = given[COORDINATOR]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise MedjaxError(f"{COORDINATOR}={address!r}: expected host:port, e.g. 10.0.0.1:1234")
  num, pid = _int(env, NUM_PROCESSES), _int(env, PROCESS_ID)
  if num < 1:
    raise MedjaxError(f"{NUM_PROCESSES}={num}: expected a positive integer")
  if not 0 <= pid < num:
    raise MedjaxError(f"{PROCESS_ID}={pid}: expected 0 <= {PROCESS_ID} < {NUM_PROCESSES}={num}")
  kwargs = {"coordinator_address": address, "num_processes": num, "process_id": pid,
            "cluster_detection_method": "deactivate"}
  ids = _local_device_ids(env)
  if ids is not None:
    kwargs["local_device_ids"] = ids
  return Plan("generic", kwargs)


def _detected_cluster(env: Mapping[str, str], tpu_vm: bool) -> str | None:
  """The cluster whose environment JAX reads by itself, if any."""
  try:
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
      return "slurm"
  except ValueError:
    raise MedjaxError(f"SLURM_NTASKS={env['SLURM_NTASKS']!r}: expected an integer") from None
  if len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
    return "tpu"
  if env.get("MEDJAX_DISTRIBUTED", "") == "1":
    return "MEDJAX_DISTRIBUTED=1"
  if env.get("OMPI_MCA_orte_hnp_uri"):
    return "open mpi"
  return "cloud tpu vm" if tpu_vm else None


def _on_cloud_tpu_vm() -> bool:
  try:  # JAX's own check (PCI ids under /sys; no network); private, hence the guard
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def plan_from_env(env: Mapping[str, str], tpu_vm: bool | None = None) -> Plan | None:
  """What `maybe_initialize_distributed` would do in `env`: a Plan, or None for one process.

  `tpu_vm` (default: detected) allows `JAX_COORDINATOR_ADDRESS` alone on Cloud TPU VMs, where
  JAX reads the process count and id from the VM metadata.
  """
  detected = _detected_cluster(env, _on_cloud_tpu_vm() if tpu_vm is None else tpu_vm)
  plan = _generic(env, detected)
  if plan is not None:
    return plan
  if detected in (None, "open mpi", "cloud tpu vm"):
    return None  # as before: these start only with a coordinator or MEDJAX_DISTRIBUTED=1
  ids = _local_device_ids(env)
  return Plan(detected, {} if ids is None else {"local_device_ids": ids})


def select_cpu_collectives(env: Mapping[str, str]) -> None:
  """Gloo for collectives between the CPU devices of several processes, unless chosen already.

  Without it, older JAX releases have no cross-process CPU collectives at all; it only affects
  the CPU backend, so it is harmless on GPU and TPU hosts.
  """
  if CPU_COLLECTIVES.upper() in env:
    return
  if getattr(jax.config, CPU_COLLECTIVES) != "gloo":
    jax.config.update(CPU_COLLECTIVES, "gloo")


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` when `env` (default `os.environ`) describes several processes.

  Call it first, before anything touches a JAX device. Idempotent; returns whether
  `jax.distributed` is running.
  """
  if jax.distributed.is_initialized():
    _state["done"] = True
    return True
  if _state["done"]:
    return False
  env = os.environ if env is None else env
  plan = plan_from_env(env)
  if plan is not None:
    select_cpu_collectives(env)
    try:
      jax.distributed.initialize(**plan.kwargs)
    except RuntimeError as e:
      if "before any JAX calls" in str(e):
        raise MedjaxError("jax.distributed: maybe_initialize_distributed() must run before "
                          "anything uses a JAX device (jax.devices(), an array, a jit)") from None
      raise
    logging.info("jax.distributed (%s): process %d of %d, %d local of %d devices", plan.source,
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  _state["done"] = True
  return plan is not None
