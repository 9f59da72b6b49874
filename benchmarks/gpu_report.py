"""benchmarks/gpu.sh's helpers: carried wheels, the machine's header, the closing summary.

  python benchmarks/gpu_report.py install WHEEL_DIR SITE_DIR   # wheels of missing packages only
  python benchmarks/gpu_report.py env                          # versions, devices
  python benchmarks/gpu_report.py summary OUT_DIR [SECTIONS]   # the table of OUT_DIR/*.json

`install` installs (pip --target, no index, no deps) only the wheels whose distribution this
Python lacks, so a carried wheel never shadows the machine's own jax, torch or numpy; without
pip it unpacks them. `summary` reads what benchmarks/unet.py, train_step.py and sample.py wrote
(`--json`) and prints medjax / PyTorch ratios of time and peak device memory, images/s and MFU.
"""
import glob
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import zipfile


def missing_wheels(wheel_dir: str) -> list[str]:
  """Wheels in `wheel_dir` whose distribution is not installed here."""
  out = []
  for path in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
    name = os.path.basename(path).split("-")[0]
    try:
      importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out.append(path)
  return out


def install(wheel_dir: str, site: str) -> int:
  wheels = missing_wheels(wheel_dir)
  names = [os.path.basename(w).split("-")[0] for w in wheels]
  print(f"wheels: installing {len(wheels)} missing ({', '.join(names) or 'none'}) into {site}")
  if not wheels:
    return 0
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", site, *wheels]
  if subprocess.run(cmd, check=False).returncode == 0:
    return 0
  print("wheels: pip failed; unpacking them instead")
  os.makedirs(site, exist_ok=True)
  for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
      z.extractall(site)
  return 0


def env() -> int:
  print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
  versions = []
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers",
               "transformers", "huggingface-hub", "numpy", "protobuf", "etils", "grain"):
    try:
      versions.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      versions.append(f"{name} -")
  print(", ".join(versions))
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    print(f"jax backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}")
  except Exception as e:  # pylint: disable=broad-except
    print(f"jax: {type(e).__name__}: {e}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
    cuda = torch.cuda.is_available()
    print(f"torch cuda {torch.version.cuda}: "
          + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if cuda else "none"))
  except Exception as e:  # pylint: disable=broad-except
    print(f"torch: {type(e).__name__}: {e}")
  return 0


def _load(out_dir: str, name: str) -> dict:
  try:
    with open(os.path.join(out_dir, name)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _cell(side: dict, key: str, spec: str, scale: float = 1.0) -> str:
  value = side.get(key)
  if value is None:
    return side.get("error", "-")[:24] if isinstance(side, dict) and "error" in side else "-"
  return format(value * scale, spec)


def _ratio(a: dict, b: dict, key: str) -> str:
  return f"{a[key] / b[key]:.2f}" if a.get(key) and b.get(key) else "-"


def _row(label: str, j: dict, p: dict, extra: str = "") -> str:
  return (f"{label:38} {_cell(j, 'median_s', '.4f'):>9} {_cell(p, 'median_s', '.4f'):>9} "
          f"{_ratio(j, p, 'median_s'):>6} {_cell(j, 'peak_bytes', '.2f', 2**-30):>9} "
          f"{_cell(p, 'peak_bytes', '.2f', 2**-30):>9} {_ratio(j, p, 'peak_bytes'):>6}  {extra}")


def summary(out_dir: str, sections: str | None = None) -> int:
  print(f"{'section / shape':38} {'medjax s':>9} {'torch s':>9} {'time x':>6} {'medjax GB':>9} "
        f"{'torch GB':>9} {'mem x':>6}  (x = medjax / PyTorch; below 1 is better)")
  unet = _load(out_dir, "unet.json").get("rows", [])
  compiled = {(r["config"], r["mode"]): r.get("torch_compile", {})
              for r in _load(out_dir, "unet_compile.json").get("rows", [])}
  for r in unet:
    j = r.get("jax", {})
    tail = f"medjax compile {j['compile_s']:.0f} s" if "compile_s" in j else ""
    shape = f"{r['config']} b{r['batch']} {r['dtype']}"
    print(_row(f"(a) unet {r['mode']} {shape}", j, r.get("torch", {}), tail))
    tc = compiled.get((r["config"], r["mode"]))
    if tc:
      print(_row(f"(a) unet {r['mode']} vs torch.compile", j, tc))
  for r in _load(out_dir, "train_step.json").get("rows", []):
    j, p, t = r.get("jax", {}), r.get("torch", {}), r.get("throughput", {})
    shape = f"{r['config']} b{r['batch']} {r['dtype']}"
    print(_row(f"(b) train {r['kind']} {shape}", j, p,
               f"medjax compile {j['compile_s']:.0f} s" if "compile_s" in j else ""))
    mfu = lambda key, t=t: f"{100 * t[key]:.1f}%" if t.get(key) is not None else "-"
    imgs = lambda key, t=t: f"{t[key]:.2f}" if t.get(key) is not None else "-"
    tf = lambda v: f"{v / 1e12:.3g}" if v else "-"
    matmul = f"{t['matmul_tflops']:.3g}" if t.get("matmul_tflops") else "-"
    print(f"    images/s medjax {imgs('medjax_images_per_s')} torch {imgs('torch_images_per_s')}"
          f" | TFLOP/step xla {tf(j.get('flops'))} model {tf(j.get('model_flops'))}"
          f" | MFU (xla) medjax {mfu('medjax_flops_mfu')} torch {mfu('torch_flops_mfu')}"
          f" | MFU (model) medjax {mfu('medjax_model_flops_mfu')} torch "
          f"{mfu('torch_model_flops_mfu')} | peak {t.get('peak_tflops') or '-'} TFLOP/s; vs "
          f"measured matmul {matmul} TFLOP/s: medjax {mfu('medjax_model_flops_mfu_matmul')} "
          f"torch {mfu('torch_model_flops_mfu_matmul')}")
  for r in _load(out_dir, "sample.json").get("rows", []):
    j, p = r.get("jax", {}), r.get("torch", {})
    shape = f"{r['config']} b{r['batch']} {r['dtype']} {r['resolution']}px"
    print(_row(f"(c) sample {r['steps']} steps {shape}", j, p,
               f"images/s medjax {_cell(j, 'images_per_s', '.2f')} torch "
               f"{_cell(p, 'images_per_s', '.2f')}"))
  if os.path.exists(os.path.join(out_dir, "attention.txt")):
    print("(d) attention: see attention.txt / gpu_log.txt")
  if sections and os.path.exists(sections):
    with open(sections) as f:
      print("sections (name exit seconds): " + "; ".join(line.strip() for line in f))
  return 0


def main(argv: list[str]) -> int:
  if len(argv) == 3 and argv[0] == "install":
    return install(argv[1], argv[2])
  if argv == ["env"]:
    return env()
  if len(argv) in (2, 3) and argv[0] == "summary":
    return summary(*argv[1:])
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
