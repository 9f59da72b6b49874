"""Peak memory of paper B's evaluation (configs/eval_paper_b.py) against the number of images.

  nice -n 19 python benchmarks/eval_memory.py                   # 500 and 5,000 images, 512 px
  python benchmarks/eval_memory.py --sizes=200,1000 --out=/tmp/eval_memory --keep

For each size, `medjax.data.make_phantoms` writes a CheXpert-v1.0-small tree of that many 512 px
phantom chest X-rays (JPEG; train.csv + valid.csv, every tenth patient in valid.csv), then a
fresh process runs the paper B protocol on it at 512 px with the embedded tiny model: CheXpert's
own splits with `split.source_test='val'` (valid.csv as test, 10% of the train patients as val),
a ResNet-18 trained a few steps at 32 px, 2 generated images per class, the VAE table on 8 test
images at 512 px, FID over 16 images per set. Every split goes through the on-disk image stores,
so the peak resident memory (VmHWM) should not grow with the size; it prints both peaks, their
ratio and the wall times. Disk: about 0.8 MB per image for the stores plus the JPEGs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_one(root: str, workdir: str) -> dict:
  """The protocol on one phantom tree, in this process; returns its peak RSS and counts."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  from medjax.eval import protocols  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("eval_paper_b",
                                                os.path.join(ROOT, "configs", "eval_paper_b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("")
  c.resolution = 512
  c.data.source, c.data.root = "chexpert", root
  c.data.split.mode, c.data.split.source_test = "source", "val"
  c.generation.num_per_class, c.generation.num_inference_steps = 2, 2
  c.generation.batch_size = 2
  c.classifier.num_steps, c.classifier.batch_size = 4, 8
  c.classifier.predict_batch_size = 16
  c.recon.num_images, c.recon.resolutions = 8, (512,)
  c.progress_bar = False
  start = time.perf_counter()
  results = protocols.run_protocol(c, workdir)
  stores = os.path.join(workdir, "stores")
  sizes = {name: json.load(open(os.path.join(stores, name, "manifest.json")))["count"]
           for name in sorted(os.listdir(stores)) if not name.startswith(".")}
  return {"peak_mib": _peak_mib(), "seconds": time.perf_counter() - start, "stores": sizes,
          "auc_real_test": results["classifier_real_test"]["auc"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="500,5000", help="image counts, comma-separated")
  parser.add_argument("--out", default="", help="folder for the trees and workdirs (temp)")
  parser.add_argument("--keep", action="store_true", help="keep the trees and workdirs")
  parser.add_argument("--child", nargs=2, metavar=("ROOT", "WORKDIR"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(run_one(*args.child)), flush=True)
    return
  from medjax.data import make_phantoms  # pylint: disable=g-import-not-at-top
  out = args.out or tempfile.mkdtemp(prefix="medjax-eval-memory-")
  rows = []
  try:
    for num in (int(s) for s in args.sizes.split(",")):
      start = time.perf_counter()
      root = make_phantoms.write_chexpert_phantoms(os.path.join(out, f"tree_{num}"), num,
                                                   size=512, seed=0)
      written = time.perf_counter() - start
      workdir = os.path.join(out, f"eval_{num}")
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, workdir],
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": ROOT})
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
      if proc.returncode or not lines:
        sys.exit(f"size {num}: the evaluation failed:\n{proc.stderr[-4000:]}")
      row = {"images": num, "tree_seconds": round(written, 1), **json.loads(lines[-1][7:])}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if not args.keep:
        shutil.rmtree(os.path.join(out, f"tree_{num}"), ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
  finally:
    if not args.keep and not args.out:
      shutil.rmtree(out, ignore_errors=True)
  print(f"{'images':>8} {'peak RSS (MiB)':>15} {'eval (s)':>9}  stores")
  for r in rows:
    print(f"{r['images']:>8} {r['peak_mib']:>15.0f} {r['seconds']:>9.0f}  {r['stores']}")
  if len(rows) > 1:
    print(f"peak ratio {rows[-1]['images']} / {rows[0]['images']} images: "
          f"{rows[-1]['peak_mib'] / rows[0]['peak_mib']:.3f}")


if __name__ == "__main__":
  main()
