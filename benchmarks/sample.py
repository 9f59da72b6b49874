"""50-step DDIM text-to-image: medjax `sd.generate` vs diffusers `StableDiffusionPipeline`.

  python benchmarks/sample.py                         # tiny and mid pipelines, 50 DDIM steps
  python benchmarks/sample.py --configs=mid --steps=25 --batch=2
  python benchmarks/sample.py --configs=sd15 --bf16 --batch=8 --resolution=512   # GPU (gpu.sh)

Both sides get the same random pipeline (diffusers writes it, medjax loads the directory), the
same prompt, guidance 7.5 and the same initial latents. Each side runs in its own process;
times are medians over `--repeats` calls after a warm-up call (medjax's first call compiles
the whole scan once). Ratios are medjax / PyTorch. images/s = batch / median time (the VAE
decode and the copy of the images to the host included on both sides).
Configs: 'tiny' the tests' tiny SD1 layout (64^2), 'mid' that with benchmarks/unet.py's mid
U-Net, 'sd15' SD1.5's sizes (benchmarks/pipelines.py; `--pipeline_dir` shares one with
train_step.py). `--bf16`: both sides hold bf16 weights and compute in bf16 (diffusers
`torch_dtype=bfloat16`, whose attention is PyTorch SDPA; medjax `dtype` and `param_dtype`
bfloat16), as inference is run. Memory: peak RSS while sampling on CPU, peak device bytes on
GPU (the loaded weights included on both sides).

On a GPU, `bash benchmarks/gpu.sh` runs unet.py, train_step.py and sample.py (and more) at the
SD1.5 shape in bf16, batch 8, in under 8 minutes, and prints one summary table (its header
says what it prints and how its budget is spent).
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

import device_stats  # pylint: disable=g-import-not-at-top,wrong-import-position
import pipelines  # pylint: disable=g-import-not-at-top,wrong-import-position
import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPT = "a chest x-ray with pleural effusion"
CONFIGS = ("tiny", "mid", "sd15")


def write_pipeline(config: str, out_dir: str, resolution: int) -> None:
  """A random SD pipeline: the 'tiny' test layout, the 'mid' U-Net of benchmarks/unet.py, or
  SD1.5's sizes (pipelines.write_pipeline)."""
  if config == "sd15":
    pipelines.write_pipeline("sd15", out_dir)
    return
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  from tests import tiny_diffusers  # pylint: disable=g-import-not-at-top
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


def run_jax(path, steps, batch, repeats, resolution, bf16):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from medjax import StableDiffusion  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  sd = StableDiffusion.from_pretrained(path, dtype=dtype, param_dtype=dtype)
  latents = np.random.default_rng(0).standard_normal(
      (batch, resolution // 8, resolution // 8, 4)).astype(np.float32)
  fn = lambda: sd.generate([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5,
                           scheduler="ddim", height=resolution, width=resolution,
                           latents=latents)
  out = timed(fn, repeats)
  device = jax.devices()[0]
  out.update(peak_bytes=device_stats.jax_peak_bytes(device, unet_bench.peak_host_bytes),
             device=device.platform, device_kind=device.device_kind)
  return out


def run_torch(path, steps, batch, repeats, resolution, bf16):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if bf16 else torch.float32
  pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  latents = torch.from_numpy(np.random.default_rng(0).standard_normal(
      (batch, resolution // 8, resolution // 8, 4)).astype(np.float32)).permute(0, 3, 1, 2)
  latents = latents.to(device=device, dtype=dtype)
  fn = lambda: pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=7.5,
                    height=resolution, width=resolution, latents=latents, output_type="np")
  with torch.no_grad():
    out = timed(fn, repeats)
  if device == "cuda":
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
  out.update(device=device)
  return out


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


def spawn(framework: str, path: str, resolution: int, args) -> dict:
  """One side in its own process: its result, or {'error': ...} (failure or timeout)."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
         f"--path={path}", f"--steps={args.steps}", f"--batch={args.batch}",
         f"--repeats={args.repeats}", f"--resolution={resolution}"]
  cmd += ["--bf16"] if args.bf16 else []
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    print(f"{framework}: timeout after {args.timeout} s", flush=True)
    return {"error": f"timeout after {args.timeout} s"}
  lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
  if not lines:
    print(f"{framework} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", flush=True)
    return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
  return json.loads(lines[-1][len("RESULT "):])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,mid", help=f"comma-separated: {CONFIGS}")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--resolution", type=int, default=256, help="mid and sd15 (tiny: 64)")
  parser.add_argument("--bf16", action="store_true", help="bf16 weights and compute, both sides")
  parser.add_argument("--pipeline_dir", help="the random pipeline: read if there, else written "
                      "there and kept (one config)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per side (subprocess)")
  parser.add_argument("--json", help="write all results to this file")
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run = run_jax if args.worker == "jax" else run_torch
    print("RESULT " + json.dumps(run(args.path, args.steps, args.batch, args.repeats,
                                     args.resolution, args.bf16)))
    return 0
  configs = args.configs.split(",")
  for config in configs:
    if config not in CONFIGS:
      parser.error(f"--configs: unknown config {config!r}; expected some of {CONFIGS}")
  if args.pipeline_dir and len(configs) != 1:
    parser.error("--pipeline_dir holds one pipeline: give one --configs")
  print(f"{'config':6} {'medjax s':>9} {'torch s':>9} {'time x':>7} {'medjax MB':>10} "
        f"{'torch MB':>9} {'mem x':>6} {'medjax img/s':>12} {'torch img/s':>11}  "
        f"(medjax compile+first s)  [{args.steps} DDIM steps, batch {args.batch}, "
        f"{'bf16' if args.bf16 else 'fp32'}]")
  rows, failed = [], False
  for config in configs:
    resolution = 64 if config == "tiny" else args.resolution
    with tempfile.TemporaryDirectory() as tmp:
      path = args.pipeline_dir or os.path.join(tmp, "pipe")
      pipelines.ensure(config, path, lambda c, d, r=resolution: write_pipeline(c, d, r))
      results = {framework: spawn(framework, path, resolution, args)
                 for framework in ("jax", "torch")}
    j, p = results["jax"], results["torch"]
    for r in (j, p):
      if "median_s" in r:
        r["images_per_s"] = args.batch / r["median_s"]
    rows.append(dict(config=config, steps=args.steps, batch=args.batch, resolution=resolution,
                     dtype="bf16" if args.bf16 else "fp32", jax=j, torch=p))
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"benchmark": "sample", "rows": rows}, f, indent=1)
    if "median_s" not in j or "median_s" not in p:
      failed = True
      continue
    print(f"{config:6} {j['median_s']:9.3f} {p['median_s']:9.3f} "
          f"{j['median_s'] / p['median_s']:7.2f} {j['peak_bytes'] / 2**20:10.0f} "
          f"{p['peak_bytes'] / 2**20:9.0f} {j['peak_bytes'] / p['peak_bytes']:6.2f} "
          f"{j['images_per_s']:12.2f} {p['images_per_s']:11.2f}  "
          f"({j['first_s']:.1f}) [{resolution}^2, {j['device']}]", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
