"""launch/: sweep planning and its three modes, and the launch scripts' syntax (no jax needed)."""
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

GRID = "learning_rate=1e-3,5e-3;textual_inversion.num_vectors=8,64"
CONFIG = "configs/cxr_ti.py:paper"


def _sweep(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120, check=False)


def test_grid_product_literals_and_order():
  grid = sweep.parse_grid(" learning_rate=1e-3, 5e-3 ; textual_inversion.num_vectors=8,64;"
                          "model.pretrained=/w/sd-1.5,runwayml/sd;remat=True;"
                          "sample.prompts='a, b',\"c;d\";mesh.rules=((embed, fsdp),)")
  assert grid == [("learning_rate", [0.001, 0.005]), ("textual_inversion.num_vectors", [8, 64]),
                  ("model.pretrained", ["/w/sd-1.5", "runwayml/sd"]), ("remat", [True]),
                  ("sample.prompts", ["a, b", "c;d"]), ("mesh.rules", ["((embed, fsdp),)"])]
  assert isinstance(grid[1][1][0], int) and isinstance(grid[3][1][0], bool)
  points = sweep.expand(grid[:2])
  assert points == [[("learning_rate", 0.001), ("textual_inversion.num_vectors", 8)],
                    [("learning_rate", 0.001), ("textual_inversion.num_vectors", 64)],
                    [("learning_rate", 0.005), ("textual_inversion.num_vectors", 8)],
                    [("learning_rate", 0.005), ("textual_inversion.num_vectors", 64)]]
  assert sweep.parse_grid("") == [] and sweep.expand([]) == [[]]
  assert sweep.parse_grid("config.seed=1,2") == [("seed", [1, 2])]


def test_run_names_and_workdirs():
  runs = sweep.plan("/runs", sweep.parse_grid(GRID), sweep.parse_sets(["mixed_precision=bf16"]))
  assert [r.name for r in runs] == [
      "learning_rate=0.001,num_vectors=8", "learning_rate=0.001,num_vectors=64",
      "learning_rate=0.005,num_vectors=8", "learning_rate=0.005,num_vectors=64"]
  assert runs[0].workdir == "/runs/learning_rate=0.001,num_vectors=8"
  assert runs[0].overrides == (("mixed_precision", "bf16"), ("learning_rate", 0.001),
                               ("textual_inversion.num_vectors", 8))
  # Path-unsafe characters are replaced; keys sharing a last part keep their full name; names
  # that sanitise alike stay distinct.
  runs = sweep.plan("r", sweep.parse_grid("seed=1;sample.seed=2;model.pretrained=a/b,a_b,'x y'"))
  assert [r.name for r in runs] == ["seed=1,sample.seed=2,pretrained=a_b",
                                    "seed=1,sample.seed=2,pretrained=a_b-1",
                                    "seed=1,sample.seed=2,pretrained=x_y"]
  assert len({r.workdir for r in runs}) == 3
  long = sweep.run_name([("sample.prompts", "x" * 500)], ["sample.prompts"])
  assert len(long) <= sweep.MAX_NAME
  assert sweep.plan("r", [])[0].name == "run"


@pytest.mark.parametrize("grid, message", [
    ("learning_rate", "key 'learning_rate' has no values"),
    ("learning_rate=", "key 'learning_rate' has no values"),
    ("learning_rate=1e-3;learning_rate=5e-3", "key 'learning_rate' appears more than once"),
    ("=1,2", "has no key"),
    ("learning rate=1", "is not a config key"),
    ("seed=1,,2", "empty value"),
    ("seed=1,1.0,1", "lists the value 1 more than once"),
])
def test_bad_grids_are_one_line_errors(grid, message):
  with pytest.raises(sweep.GridError, match=message):
    sweep.parse_grid(grid)
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=/r", f"--grid={grid}")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_bad_sets():
  with pytest.raises(sweep.GridError, match="no value"):
    sweep.parse_sets(["remat"])
  with pytest.raises(sweep.GridError, match="more than once"):
    sweep.parse_sets(["seed=1", "seed=2"])
  assert sweep.parse_sets(["sample.prompts=a, b; c"]) == [("sample.prompts", "a, b; c")]
  with pytest.raises(sweep.GridError, match="both --grid and --set"):
    sweep.plan("r", sweep.parse_grid("seed=1,2"), sweep.parse_sets(["seed=3"]))


def test_print_mode_commands_parse_back():
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=/runs/ti dir", f"--grid={GRID}",
                "--set", "sample.prompts=('a chest x-ray', 'a <lung>')", "--set=remat=True")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 4
  assert shlex.split(lines[0]) == [
      "python", "-m", "medjax.train", f"--config={CONFIG}",
      "--workdir=/runs/ti dir/learning_rate=0.001,num_vectors=8",
      "--config.sample.prompts=('a chest x-ray', 'a <lung>')", "--config.remat=True",
      "--config.learning_rate=0.001", "--config.textual_inversion.num_vectors=8"]
  assert shlex.split(lines[3])[-2:] == ["--config.learning_rate=0.005",
                                        "--config.textual_inversion.num_vectors=64"]
  # No jax (nor medjax) import: printing a sweep is instant.
  code = ("import runpy, sys; sys.argv = ['sweep', '--config=c', '--workdir_root=r', '--grid=a=1'];"
          f"runpy.run_path({str(ROOT / 'launch' / 'sweep.py')!r}, run_name='__main__')")
  proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True,
                        text=True, timeout=60, check=False)
  assert "python -m medjax.train" in proc.stdout
  imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
  assert "absl" in imported and not imported & {"jax", "medjax", "ml_collections"}


def test_slurm_mode_array_script(tmp_path):
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=/shared/ti", f"--grid={GRID}",
                "--mode=slurm", "--nodes=2", "--gpus_per_node=4", "--max_parallel=2",
                "--partition=gpu", "--time=12:00:00", "--sbatch=account=med")
  assert proc.returncode == 0, proc.stderr
  script = proc.stdout
  for line in ("#SBATCH --array=0-3%2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
               "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00",
               "#SBATCH --account=med", "XLA_PYTHON_CLIENT_MEM_FRACTION",
               'srun --kill-on-bad-exit=1 python -m medjax.train "${ARGS[@]}"'):
    assert line in script, line
  assert "--workdir=/shared/ti/learning_rate=0.005,num_vectors=64" in script
  out = tmp_path / "sweep.sbatch"
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=/shared/ti", "--grid=seed=0,1,2",
                "--mode=slurm", f"--out={out}")
  assert proc.returncode == 0 and proc.stdout == "", proc.stderr
  text = out.read_text()
  assert "#SBATCH --array=0-2\n" in text
  assert subprocess.run(["bash", "-n", str(out)], check=False).returncode == 0
  # Each array task picks its own run's arguments: run the case block with a stub srun.
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  (fake / "srun").chmod(0o755)
  env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "SLURM_GPUS_ON_NODE": "2"}
  proc = subprocess.run(["bash", str(out)], env=env, capture_output=True, text=True, check=False,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-7:] == [
      "--kill-on-bad-exit=1", "python", "-m", "medjax.train", f"--config={CONFIG}",
      "--workdir=/shared/ti/seed=1", "--config.seed=1"]
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=/s", "--grid=seed=0,1,2", "--mode=slurm",
                f"--out={tmp_path / 'dry.sbatch'}", "--dry_run")
  assert "#SBATCH --array=0-2" in proc.stdout and not (tmp_path / "dry.sbatch").exists()


def test_local_mode_runs_in_sequence_and_reports_failures(tmp_path):
  log = tmp_path / "calls.jsonl"
  fake = tmp_path / "fake_train.py"
  fake.write_text(
      "import json, sys\n"
      f"with open({str(log)!r}, 'a') as f:\n"
      "  f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
      "print('training', sys.argv[2])\n"
      "sys.exit(3 if '--config.seed=1' in sys.argv else 0)\n")
  train_command = shlex.join([sys.executable, str(fake)])
  proc = _sweep(f"--config={CONFIG}", f"--workdir_root={tmp_path / 'runs'}",
                "--grid=seed=0,1,2;learning_rate=1e-4", "--mode=local",
                f"--train_command={train_command}")
  assert proc.returncode == 1, proc.stderr
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [c[-2] for c in calls] == ["--config.seed=0", "--config.seed=1", "--config.seed=2"]
  assert calls[0] == [f"--config={CONFIG}",
                      f"--workdir={tmp_path / 'runs' / 'seed=0,learning_rate=0.0001'}",
                      "--config.seed=0", "--config.learning_rate=0.0001"]
  out = proc.stdout
  assert out.index("training --workdir") < out.index("[sweep] 2 of 3 runs succeeded")
  assert "FAILED (exit code 3): seed=1,learning_rate=0.0001" in out
  assert "FAILED (exit code 3): seed=0" not in out and "FAILED (exit code 3): seed=2" not in out
  # All succeed: exit code 0. --dry_run runs nothing.
  proc = _sweep(f"--config={CONFIG}", f"--workdir_root={tmp_path / 'runs'}", "--grid=seed=0,2",
                "--mode=local", f"--train_command={train_command}")
  assert proc.returncode == 0 and "2 of 2 runs succeeded" in proc.stdout, proc.stdout
  n = len(log.read_text().splitlines())
  proc = _sweep(f"--config={CONFIG}", "--workdir_root=r", "--grid=seed=0,2", "--mode=local",
                "--dry_run")
  assert proc.returncode == 0 and proc.stdout.count("python -m medjax.train") == 2
  assert len(log.read_text().splitlines()) == n


@pytest.mark.parametrize("script", ["slurm_multi_gpu.sh", "tpu_pod.sh"])
def test_scripts_parse(script):
  proc = subprocess.run(["bash", "-n", str(ROOT / "launch" / script)], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr


def test_slurm_multi_gpu_script_runs_train_on_every_node(tmp_path):
  text = (ROOT / "launch" / "slurm_multi_gpu.sh").read_text()
  for line in ("#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=",
               "XLA_PYTHON_CLIENT_MEM_FRACTION", "--config.mesh.fsdp="):
    assert line in text
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text('#!/bin/bash\necho "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"\n'
                             'printf "%s\\n" "$@"\n')
  (fake / "srun").chmod(0o755)
  env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "2"}
  proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_multi_gpu.sh"),
                         "--config=configs/cxr_unet.py:paper", "--workdir=/shared/a b"],
                        env=env, capture_output=True, text=True, check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[-7:] == [
      "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "--kill-on-bad-exit=1", "python", "-m", "medjax.train",
      "--config=configs/cxr_unet.py:paper", "--workdir=/shared/a b"]


def test_slurm_multi_gpu_script_runs_evaluate_or_export_too(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  (fake / "srun").chmod(0o755)
  script = str(ROOT / "launch" / "slurm_multi_gpu.sh")
  env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_GPUS_ON_NODE": "2"}
  proc = subprocess.run(["bash", script, "--from=/r", "--to=/e"], capture_output=True, text=True,
                        env={**env, "MEDJAX_MODULE": "medjax.export"}, check=False, timeout=60)
  assert proc.returncode == 0 and proc.stdout.splitlines()[-5:] == [
      "python", "-m", "medjax.export", "--from=/r", "--to=/e"], proc.stdout + proc.stderr
  proc = subprocess.run(["bash", script, "--x"], capture_output=True, text=True, check=False,
                        env={**env, "MEDJAX_MODULE": "os"}, timeout=60)
  assert proc.returncode == 2 and "MEDJAX_MODULE=os: expected" in proc.stderr


def test_slurm_multi_gpu_script_asks_for_an_early_signal_and_requeue():
  text = (ROOT / "launch" / "slurm_multi_gpu.sh").read_text()
  directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
  for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
    assert line in directives, directives


# A stand-in for `srun python -m medjax.train`: runs until SIGTERM, then "saves" and exits 0.
FAKE_TRAIN = """#!/bin/bash
echo $$ > "$FAKE_DIR/srun.pid"
trap 'echo "srun: SIGTERM, saved"; exit 0' TERM
echo "srun: started"
while true; do sleep 0.05; done
"""


def _slurm_run(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text(FAKE_TRAIN)
  (fake / "scontrol").write_text('#!/bin/bash\necho "$*" >> "$FAKE_DIR/scontrol.log"\n')
  for name in ("srun", "scontrol"):
    (fake / name).chmod(0o755)
  env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "4242",
         "FAKE_DIR": str(tmp_path)}
  proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm_multi_gpu.sh"),
                           "--config=configs/cxr_unet.py", "--workdir=/shared/x"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  while not lines or "srun: started" not in lines[-1]:
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)
  return proc, "".join(lines)


@pytest.mark.parametrize("signal_from", ["early signal", "sigterm to the job"])
def test_slurm_multi_gpu_script_stops_the_run_exits_0_and_requeues(tmp_path, signal_from):
  proc, head = _slurm_run(tmp_path)
  if signal_from == "early signal":  # --signal=B:USR1@120: the batch shell only
    os.kill(proc.pid, signal.SIGUSR1)
  else:  # SLURM signals every process of the job: the batch shell must not add a second one
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # it waits for the run
    os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
  out = head + proc.communicate(timeout=30)[0]
  assert proc.returncode == 0, out
  assert out.count("srun: SIGTERM, saved") == 1, out
  assert "requeueing job 4242" in out
  assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


def test_slurm_multi_gpu_script_passes_a_failure_on_and_does_not_requeue(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text("#!/bin/bash\nexit 3\n")
  (fake / "scontrol").write_text(f"#!/bin/bash\ntouch {tmp_path}/scontrol-called\n")
  for name in ("srun", "scontrol"):
    (fake / name).chmod(0o755)
  proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm_multi_gpu.sh"), "--workdir=/x"],
                        env={"PATH": f"{fake}:/usr/bin:/bin", "SLURM_GPUS_ON_NODE": "1"},
                        capture_output=True, text=True, check=False, timeout=60)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert not (tmp_path / "scontrol-called").exists()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_tpu_pod_script_needs_tpu_and_zone():
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh")], capture_output=True,
                        text=True, check=False, env={"PATH": "/usr/bin:/bin"})
  assert proc.returncode == 2 and "usage" in proc.stderr
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "setup"],
                        capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
  assert proc.returncode != 0 and "TPU" in proc.stderr
