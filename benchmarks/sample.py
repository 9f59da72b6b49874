"""50-step DDIM text-to-image: medjax `sd.generate` vs diffusers `StableDiffusionPipeline`.

  python benchmarks/sample.py                         # tiny and mid pipelines, 50 DDIM steps
  python benchmarks/sample.py --configs=mid --steps=25 --batch=2

Both sides get the same random pipeline (diffusers writes it, medjax loads the directory), the
same prompt, guidance 7.5 and the same initial latents. Each side runs in its own process;
times are medians over `--repeats` calls after a warm-up call (medjax's first call compiles
the whole scan once). Ratios are medjax / PyTorch.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPT = "a chest x-ray with pleural effusion"


def write_pipeline(config: str, out_dir: str, resolution: int) -> None:
  """A random SD pipeline: the 'tiny' test layout or the 'mid' U-Net of benchmarks/unet.py."""
  from tests import tiny_diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  pipe = tiny_diffusers.make_pipeline_dir(out_dir, style="sd1")
  if config == "mid":
    cfg = unet_bench.unet_config("mid")
    cfg.update(cross_attention_dim=pipe.text_encoder.config.hidden_size,
               sample_size=resolution // 8)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**cfg).eval()
    pipe.register_modules(unet=pipe.unet)
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(out_dir)
    pipe.save_pretrained(out_dir)


def run_jax(path, steps, batch, repeats, resolution):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from medjax import StableDiffusion  # pylint: disable=g-import-not-at-top
  sd = StableDiffusion.from_pretrained(path)
  latents = np.random.default_rng(0).standard_normal(
      (batch, resolution // 8, resolution // 8, 4)).astype(np.float32)
  fn = lambda: sd.generate([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5,
                           scheduler="ddim", height=resolution, width=resolution,
                           latents=latents)
  return timed(fn, repeats)


def run_torch(path, steps, batch, repeats, resolution):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler, StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe = StableDiffusionPipeline.from_pretrained(path)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal(
      (batch, resolution // 8, resolution // 8, 4)).astype(np.float32)).permute(0, 3, 1, 2)
  fn = lambda: pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5,
                    height=resolution, width=resolution, latents=latents, output_type="np")
  with torch.no_grad():
    return timed(fn, repeats)


def timed(fn, repeats):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  unet_bench.reset_peak_host_bytes()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return dict(first_s=first, median_s=statistics.median(times),
              peak_bytes=unet_bench.peak_host_bytes())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,mid")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run = run_jax if args.worker == "jax" else run_torch
    print("RESULT " + json.dumps(run(args.path, args.steps, args.batch, args.repeats,
                                     args.resolution)))
    return
  print(f"{'config':6} {'medjax s':>9} {'torch s':>9} {'time x':>7} {'medjax MB':>10} "
        f"{'torch MB':>9} {'mem x':>6}  (medjax compile+first s)  [{args.steps} DDIM steps, "
        f"batch {args.batch}, {args.resolution}^2]")
  for config in args.configs.split(","):
    resolution = 64 if config == "tiny" else args.resolution
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "pipe")
      write_pipeline(config, path, resolution)
      results = {}
      for framework in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
               f"--path={path}", f"--steps={args.steps}", f"--batch={args.batch}",
               f"--repeats={args.repeats}", f"--resolution={resolution}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not lines:
          raise RuntimeError(f"{framework} {config} failed:\n{out.stderr[-3000:]}")
        results[framework] = json.loads(lines[-1][len("RESULT "):])
    j, p = results["jax"], results["torch"]
    print(f"{config:6} {j['median_s']:9.3f} {p['median_s']:9.3f} "
          f"{j['median_s'] / p['median_s']:7.2f} {j['peak_bytes'] / 2**20:10.0f} "
          f"{p['peak_bytes'] / 2**20:9.0f} {j['peak_bytes'] / p['peak_bytes']:6.2f}  "
          f"({j['first_s']:.1f})", flush=True)


if __name__ == "__main__":
  main()
