"""benchmarks/gpu.sh runs once on a lent GPU: its shell syntax, its wheel selection and its
summary are checked here, where a mistake costs nothing (no timings: synthetic results)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_report  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def test_gpu_sh_parses():
  out = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True,
                       text=True, check=False)
  assert out.returncode == 0, out.stderr


def test_only_wheels_of_missing_packages_are_installed(tmp_path):
  """A carried wheel of a package the machine has (numpy) must never shadow it."""
  for name in ("numpy-1.0-py3-none-any.whl", "medjax_no_such_pkg-1.0-py3-none-any.whl"):
    (tmp_path / name).write_bytes(b"")
  missing = [Path(p).name for p in gpu_report.missing_wheels(str(tmp_path))]
  assert missing == ["medjax_no_such_pkg-1.0-py3-none-any.whl"]


def test_summary_prints_ratios_and_mfu(tmp_path, capsys):
  side = lambda s, gb, **kw: {"median_s": s, "peak_bytes": gb * 2**30, **kw}
  (tmp_path / "unet.json").write_text(json.dumps({"rows": [
      {"config": "sd15", "mode": "forward", "batch": 8, "dtype": "bf16",
       "jax": side(0.02, 6.0, compile_s=40.0), "torch": side(0.04, 8.0)},
      {"config": "sd15", "mode": "grad", "batch": 8, "dtype": "bf16",
       "jax": {"error": "timeout after 150 s"}, "torch": side(0.1, 20.0)}]}))
  (tmp_path / "unet_compile.json").write_text(json.dumps({"rows": [
      {"config": "sd15", "mode": "forward", "torch_compile": side(0.025, 7.0)}]}))
  (tmp_path / "train_step.json").write_text(json.dumps({"rows": [
      {"config": "sd15", "kind": "ft", "batch": 8, "dtype": "bf16",
       "jax": side(0.1, 30.0, compile_s=90.0, flops=2.5e13, model_flops=2.8e13),
       "torch": side(0.125, 40.0),
       "throughput": {"medjax_images_per_s": 80.0, "torch_images_per_s": 64.0,
                      "medjax_model_flops_mfu": 0.283, "peak_tflops": 989.4}}]}))
  (tmp_path / "sections.txt").write_text("(a) unet 0 160\n")
  gpu_report.summary(str(tmp_path), str(tmp_path / "sections.txt"))
  out = capsys.readouterr().out
  assert "(a) unet forward sd15 b8 bf16" in out and " 0.50 " in out and " 0.75 " in out
  assert "vs torch.compile" in out and " 0.80 " in out
  assert "timeout after 150 s" in out  # a failed side shows why, the rest still prints
  assert "images/s medjax 80.00 torch 64.00" in out and "28.3%" in out
  assert "(a) unet 0 160" in out
