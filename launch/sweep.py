#!/usr/bin/env python3
r"""Hyper-parameter sweeps of `python -m medjax.train`: one run per point of a grid.

  python launch/sweep.py --config=configs/cxr_ti.py:paper --workdir_root=/shared/runs/ti \
      --grid='learning_rate=1e-3,5e-3;textual_inversion.num_vectors=1,8,64' \
      [--set mixed_precision=bf16 ...] [--mode=print|local|slurm] [--dry_run]

The grid is `key=v1,v2;key2=v3,v4` (config keys as in `--config.key=value`); its Cartesian
product gives the runs. Values are Python literals where they parse (`1e-3`, `8`, `True`,
`(1, 2)`, `'a,b'`), else plain strings; commas and semicolons inside quotes or brackets don't
split. `--set key=value` (repeatable) adds the same override to every run. Each run's workdir is
`<workdir_root>/<name>`, the name made from its grid overrides, e.g.
`learning_rate=0.001,num_vectors=8`.

Modes:
  print  (default) the commands, one per line, shell-quoted.
  local  runs them one after another here, streaming their output; a failed run doesn't stop
         the sweep, the failures are listed at the end (exit code 1 if any failed).
  slurm  one sbatch job-array script (`#SBATCH --array=0-<n-1>`), to stdout or `--out`; each
         array task is one run on `--nodes` x `--gpus_per_node` GPUs, as launch/slurm_multi_gpu.sh.
`--dry_run` runs and writes nothing: local prints the commands it would run, slurm prints the
script even with `--out`.

Only the standard library and absl: no jax import, so planning a sweep is instant.
"""
import ast
import dataclasses
import hashlib
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

MODES = ("print", "local", "slurm")
TRAIN_MODULE = ("-m", "medjax.train")
KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
MAX_NAME = 120  # longer run names are cut and get a hash suffix
# Shared with launch/slurm_multi_gpu.sh: the fraction of GPU memory XLA preallocates.
MEM_FRACTION = "0.90"


class GridError(ValueError):
  """A malformed --grid or --set; the message is one line naming the culprit."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep: its name, workdir and `--config.key=value` overrides."""
  name: str
  workdir: str
  overrides: tuple[tuple[str, Any], ...]

  def args(self, config: str) -> list[str]:
    """The arguments of `python -m medjax.train` for this run."""
    return [f"--config={config}", f"--workdir={self.workdir}"] + [
        f"--config.{k}={format_value(v)}" for k, v in self.overrides]


# -- parsing ---------------------------------------------------------------------------------------

def split_top(text: str, sep: str) -> list[str]:
  """Splits on `sep` outside quotes and brackets: "a,'b,c',(1,2)" -> ['a', "'b,c'", '(1,2)']."""
  parts, cur, depth, quote = [], [], 0, ""
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth = max(depth - 1, 0)
    elif ch == sep and depth == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  return parts


def parse_value(text: str) -> Any:
  """A Python literal where `text` is one (1e-3 -> 0.001, 8 -> 8, True), else the string."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return text


def format_value(value: Any) -> str:
  """How a value is written after `--config.key=` (ml_collections parses it by the key's type)."""
  return value if isinstance(value, str) else repr(value)


def _key(raw: str, where: str) -> str:
  key = raw.strip()
  key = key.removeprefix("config.")
  if not key:
    raise GridError(f"{where}: an entry has no key; expected key=v1,v2")
  if not KEY_RE.match(key):
    raise GridError(f"{where}: {raw.strip()!r} is not a config key (like learning_rate or "
                    "textual_inversion.num_vectors)")
  return key


def parse_grid(spec: str) -> list[tuple[str, list[Any]]]:
  """'a=1,2;b.c=x,y' -> [('a', [1, 2]), ('b.c', ['x', 'y'])], keys in the order given."""
  out: list[tuple[str, list[Any]]] = []
  seen: set[str] = set()
  for entry in split_top(spec or "", ";"):
    if not entry.strip():
      continue  # 'a=1;' and empty grids are fine
    raw_key, eq, raw_values = entry.partition("=")
    key = _key(raw_key, "--grid")
    if not eq or not raw_values.strip():
      raise GridError(f"--grid: key {key!r} has no values; expected {key}=v1,v2,...")
    if key in seen:
      raise GridError(f"--grid: key {key!r} appears more than once; list all its values "
                      f"in one entry ({key}=v1,v2,...)")
    seen.add(key)
    texts = split_top(raw_values, ",")
    if any(not t.strip() for t in texts):
      raise GridError(f"--grid: key {key!r} has an empty value in {raw_values.strip()!r}")
    values = [parse_value(t) for t in texts]
    shown = [format_value(v) for v in values]
    dupes = sorted({s for s in shown if shown.count(s) > 1})
    if dupes:
      raise GridError(f"--grid: key {key!r} lists the value {dupes[0]} more than once")
    out.append((key, values))
  return out


def parse_sets(items: Sequence[str] | None) -> list[tuple[str, Any]]:
  """['a=1', 'b=x,y'] -> [('a', 1), ('b', 'x,y')]: one value each, not split on commas."""
  out: list[tuple[str, Any]] = []
  for item in items or ():
    raw_key, eq, raw_value = item.partition("=")
    key = _key(raw_key, "--set")
    if not eq:
      raise GridError(f"--set: {item!r} has no value; expected {key}=value")
    if key in dict(out):
      raise GridError(f"--set: key {key!r} is given more than once")
    out.append((key, parse_value(raw_value)))
  return out


# -- planning --------------------------------------------------------------------------------------

def expand(grid: Sequence[tuple[str, Sequence[Any]]]) -> list[list[tuple[str, Any]]]:
  """The Cartesian product, last key varying fastest: [[(k1, v), (k2, w)], ...]."""
  keys = [k for k, _ in grid]
  combos = itertools.product(*(vs for _, vs in grid))
  return [list(zip(keys, combo, strict=True)) for combo in combos]


def sanitize(text: str) -> str:
  """A path-safe name: letters, digits and ._=,+- kept, anything else becomes '_'."""
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).strip(".") or "_"
  if len(name) > MAX_NAME:
    name = name[:MAX_NAME - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
  return name


def run_name(point: Sequence[tuple[str, Any]], keys: Sequence[str]) -> str:
  """'learning_rate=0.001,num_vectors=8': each key by its last part unless two grid keys share
  it (then the full dotted key)."""
  if not point:
    return "run"
  last = [k.rsplit(".", 1)[-1] for k in keys]
  short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}
  return sanitize(",".join(f"{short[k]}={format_value(v)}" for k, v in point))


def plan(workdir_root: str, grid: Sequence[tuple[str, Sequence[Any]]],
         sets: Sequence[tuple[str, Any]] = ()) -> list[Run]:
  """The runs of a sweep, each with a distinct workdir under `workdir_root`."""
  clash = sorted({k for k, _ in grid} & {k for k, _ in sets})
  if clash:
    raise GridError(f"key {clash[0]!r} is in both --grid and --set; give it once")
  keys = [k for k, _ in grid]
  runs, used = [], set()
  for point in expand(grid):
    name = base = run_name(point, keys)
    i = 1
    while name in used:  # distinct values that sanitise alike
      name, i = f"{base}-{i}", i + 1
    used.add(name)
    runs.append(Run(name, os.path.join(workdir_root, name), tuple(list(sets) + point)))
  return runs


# -- the three modes -------------------------------------------------------------------------------

def commands(runs: Sequence[Run], config: str, prefix: Sequence[str]) -> list[str]:
  return [shlex.join(list(prefix) + r.args(config)) for r in runs]


def run_local(runs: Sequence[Run], config: str, prefix: Sequence[str], out=None) -> list[tuple]:
  """Runs one after another, output streaming through; returns [(run, exit code)] of failures."""
  out = out or sys.stdout
  failed = []
  for i, r in enumerate(runs):
    argv = list(prefix) + r.args(config)
    print(f"[sweep {i + 1}/{len(runs)}] {r.name}: {shlex.join(argv)}", file=out, flush=True)
    t0 = time.monotonic()
    try:
      code = subprocess.run(argv, check=False).returncode
    except OSError as e:  # the command itself could not start
      print(f"[sweep] {r.name}: {e}", file=out, flush=True)
      code = 127
    status = "ok" if code == 0 else f"FAILED (exit code {code})"
    print(f"[sweep {i + 1}/{len(runs)}] {r.name}: {status} in {time.monotonic() - t0:.1f}s",
          file=out, flush=True)
    if code:
      failed.append((r, code))
  return failed


GPU_ENV = f"""\
# Let XLA preallocate this fraction of each GPU (its default, 0.75, wastes memory on big runs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${{XLA_PYTHON_CLIENT_MEM_FRACTION:-{MEM_FRACTION}}}"
# With one task per node, JAX's SLURM detection would give each process only the GPU numbered
# SLURM_LOCALID (0); list all of the node's GPUs instead.
GPUS="${{SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}"
if [ "${{GPUS:-0}}" -gt 0 ] && [ -z "${{JAX_LOCAL_DEVICE_IDS:-}}" ]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((GPUS - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
"""


def slurm_script(runs: Sequence[Run], config: str, prefix: Sequence[str], *, nodes: int = 1,
                 gpus_per_node: int = 1, job_name: str = "medjax-sweep", partition: str = "",
                 time_limit: str = "", max_parallel: int = 0,
                 extra: Sequence[str] = ()) -> str:
  """One sbatch job-array script: array task i is run i (the conventions of
  launch/slurm_multi_gpu.sh: one task per node, all the node's GPUs to it)."""
  if not runs:
    raise GridError("the sweep has no runs")
  if nodes < 1 or gpus_per_node < 1:
    raise GridError(f"--nodes={nodes} and --gpus_per_node={gpus_per_node} must be >= 1")
  array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel > 0 else "")
  head = [
      "#!/bin/bash",
      f"# medjax sweep: {len(runs)} runs of `{shlex.join(prefix)}` as one SLURM job array,",
      "# generated by launch/sweep.py. Submit from the repository root with medjax's Python",
      "# environment active (sbatch passes the environment on):  sbatch THIS_FILE",
      "# Workdirs must be on a filesystem that all nodes share. Logs: slurm-<job>_<task>.out.",
      f"#SBATCH --job-name={job_name}",
      f"#SBATCH --array={array}",
      f"#SBATCH --nodes={nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={gpus_per_node}",
      "#SBATCH --output=slurm-%A_%a.out",
  ]
  head += [f"#SBATCH --partition={partition}"] if partition else []
  head += [f"#SBATCH --time={time_limit}"] if time_limit else []
  head += [f"#SBATCH {e if e.startswith('-') else '--' + e}" for e in extra]
  body = ["set -euo pipefail", "", GPU_ENV,
          'case "${SLURM_ARRAY_TASK_ID:?not a job array task}" in']
  for i, r in enumerate(runs):
    args = " ".join(shlex.quote(a) for a in r.args(config))
    body.append(f"  {i}) ARGS=({args}) ;;  # {r.name}")
  body += ['  *) echo "sweep: no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac",
           'echo "sweep task $SLURM_ARRAY_TASK_ID on ${SLURM_JOB_NUM_NODES:-1} node(s): '
           '${ARGS[*]}"',
           f'srun --kill-on-bad-exit=1 {shlex.join(prefix)} "${{ARGS[@]}}"', ""]
  return "\n".join(head + [""] + body)


# -- command line ----------------------------------------------------------------------------------

def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "The train config, configs/<name>.py[:arg].")
  flags.DEFINE_string("workdir_root", None, "Each run's workdir is <workdir_root>/<run name>.")
  flags.DEFINE_string("grid", "", "'key=v1,v2;key2=v3,v4': the runs are its Cartesian product.")
  flags.DEFINE_multi_string("set", [], "key=value, the same override for every run (repeatable).")
  flags.DEFINE_enum("mode", "print", MODES, "print the commands, run them here (local), or "
                    "write a SLURM job-array script (slurm).")
  flags.DEFINE_bool("dry_run", False, "Run and write nothing: local prints the commands, slurm "
                    "prints the script.")
  flags.DEFINE_string("out", "", "slurm: write the script here instead of to stdout.")
  flags.DEFINE_integer("nodes", 1, "slurm: nodes per run.")
  flags.DEFINE_integer("gpus_per_node", 1, "slurm: GPUs per node.")
  flags.DEFINE_string("partition", "", "slurm: #SBATCH --partition.")
  flags.DEFINE_string("time", "", "slurm: #SBATCH --time, e.g. 24:00:00.")
  flags.DEFINE_string("job_name", "medjax-sweep", "slurm: #SBATCH --job-name.")
  flags.DEFINE_integer("max_parallel", 0, "slurm: at most this many runs at once (0: no limit).")
  flags.DEFINE_multi_string("sbatch", [], "slurm: another #SBATCH option, e.g. account=abc.")
  flags.DEFINE_string("train_command", "", "Instead of `python -m medjax.train` (testing, or "
                      "another interpreter); split like a shell would.")
  flags.mark_flags_as_required(["config", "workdir_root"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    return _fail(f"unexpected arguments {argv[1:]} (quote --grid, e.g. --grid='a=1,2;b=3')")
  try:
    runs = plan(f.workdir_root, parse_grid(f.grid), parse_sets(f.set))
  except GridError as e:
    return _fail(str(e))
  if f.train_command:
    prefix = shlex.split(f.train_command)
  else:  # here: this interpreter; printed or on a cluster: whichever `python` is active there
    prefix = [sys.executable if f.mode == "local" and not f.dry_run else "python", *TRAIN_MODULE]
  if f.mode == "print" or (f.mode == "local" and f.dry_run):
    print("\n".join(commands(runs, f.config, prefix)))
    return 0
  if f.mode == "slurm":
    try:
      script = slurm_script(runs, f.config, prefix, nodes=f.nodes, gpus_per_node=f.gpus_per_node,
                            job_name=f.job_name, partition=f.partition, time_limit=f.time,
                            max_parallel=f.max_parallel, extra=f.sbatch)
    except GridError as e:
      return _fail(str(e))
    if f.out and not f.dry_run:
      with open(f.out, "w", encoding="utf-8") as fh:
        fh.write(script)
      print(f"wrote {f.out} ({len(runs)} runs); submit with: sbatch {shlex.quote(f.out)}",
            file=sys.stderr)
    else:
      sys.stdout.write(script)
    return 0
  try:
    failed = run_local(runs, f.config, prefix)
  except KeyboardInterrupt:
    print("[sweep] interrupted; the runs after the current one were not started", flush=True)
    return 130
  ok = len(runs) - len(failed)
  print(f"[sweep] {ok} of {len(runs)} runs succeeded", flush=True)
  for r, code in failed:
    print(f"[sweep] FAILED (exit code {code}): {r.name} ({r.workdir})", flush=True)
  return 1 if failed else 0


def _fail(message: str) -> int:
  print(f"sweep: error: {message}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
