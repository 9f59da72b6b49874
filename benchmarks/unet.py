"""U-Net forward and gradient step: medjax (JAX) vs diffusers (PyTorch), same config, same run.

  python benchmarks/unet.py                      # mid and sd15 configs, forward + grad
  python benchmarks/unet.py --configs=mid --modes=forward --repeats=5
  python benchmarks/unet.py --bf16               # bf16 compute (GPU; slow on CPU)
  python benchmarks/unet.py --remat              # medjax with rematerialised blocks (PyTorch as is)

Each (framework, config, mode) runs in its own subprocess so peak memory is its own: on CPU the
process's peak RSS while running the timed calls (reset after the warm-up call, so XLA's
compiler memory is not counted), on GPU peak device bytes (jax memory_stats /
torch.cuda.max_memory_allocated).
Times are medians over `--repeats` calls after one warm-up call (JAX's compile is reported
separately). The grad step is loss = mean((unet(x, t, c) - target)^2), backward, and an SGD
update of every U-Net parameter; JAX donates the params buffer as a training step would.
Ratios printed are medjax / PyTorch: below 1.0 means medjax is faster or smaller. On CPU the
process RSS of medjax also holds XLA's compiled code and compiler arenas (~1 GB); 'xla plan MB'
is the buffer plan of the compiled step alone (params + temporaries + outputs), the figure
comparable to GPU device memory.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Runnable from a checkout without installing medjax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    # block_out_channels, latent size, cross-attention width, heads (SD1 style: 8 heads)
    "mid": dict(block_out_channels=[64, 128, 256, 256], latent=32, cross_attention_dim=768),
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], latent=64, cross_attention_dim=768),
}


def unet_config(name: str) -> dict:
  c = CONFIGS[name]
  return {
      "sample_size": c["latent"], "in_channels": 4, "out_channels": 4,
      "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
      "block_out_channels": c["block_out_channels"], "layers_per_block": 2,
      "attention_head_dim": 8, "cross_attention_dim": c["cross_attention_dim"],
      "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
  }


def reset_peak_host_bytes() -> None:
  """Resets the process's peak RSS (Linux), so the peak measured excludes the compile."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def peak_host_bytes() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, repeats):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  reset_peak_host_bytes()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def run_jax(config_name, mode, repeats, bf16, remat):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from medjax import pipeline  # pylint: disable=g-import-not-at-top
  from medjax.models import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  cfg = CONFIGS[config_name]
  unet = UNet2DConditionModel.from_config(
      unet_config(config_name), dtype=jnp.bfloat16 if bf16 else jnp.float32, remat=remat)
  params = pipeline.init_params(unet, 0)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (1, cfg["latent"], cfg["latent"], 4))
  c = jax.random.normal(k2, (1, 77, cfg["cross_attention_dim"]))
  target = jax.random.normal(k3, x.shape)
  t = jnp.array([500], jnp.int32)

  if mode == "forward":
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    compiled = fwd.lower(params, x, t, c).compile()
    fn = lambda: compiled(params, x, t, c).block_until_ready()
  else:
    def loss_fn(p):
      out = unet.apply({"params": p}, x, t, c).astype(jnp.float32)
      return jnp.mean((out - target) ** 2)

    def step(p):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      return jax.tree.map(lambda a, g: a - 1e-4 * g, p, grads), loss
    compiled = jax.jit(step, donate_argnums=0).lower(params).compile()
    state = {"p": params}

    def fn():
      state["p"], loss = compiled(state["p"])
      loss.block_until_ready()
  first, median = timed(fn, repeats)
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform == "gpu" else None
  peak = stats["peak_bytes_in_use"] if stats else peak_host_bytes()
  plan = compiled.memory_analysis()
  plan_bytes = (plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
                - plan.alias_size_in_bytes) if plan else 0
  return dict(first_s=first, median_s=median, peak_bytes=peak, plan_bytes=plan_bytes,
              device=str(device.platform))


def run_torch(config_name, mode, repeats, bf16, remat):
  del remat  # the memory target allows remat on the medjax side only
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  cfg = CONFIGS[config_name]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**unet_config(config_name)).to(device)
  x = torch.randn(1, 4, cfg["latent"], cfg["latent"], device=device)
  c = torch.randn(1, 77, cfg["cross_attention_dim"], device=device)
  target = torch.randn_like(x)
  t = torch.tensor([500], device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

  if mode == "forward":
    unet.eval()

    def fn():
      with torch.no_grad(), autocast:
        unet(x, t, c).sample
      sync()
  else:
    unet.train()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-4)

    def fn():
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = torch.mean((unet(x, t, c).sample.float() - target) ** 2)
      loss.backward()
      opt.step()
      sync()
  first, median = timed(fn, repeats)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_host_bytes()
  return dict(first_s=first, median_s=median, peak_bytes=peak, device=device)


def worker(args):
  runner = run_jax if args.worker == "jax" else run_torch
  result = runner(args.configs, args.modes, args.repeats, args.bf16, args.remat)
  print("RESULT " + json.dumps(result))


def spawn(framework, config, mode, args):
  env = dict(os.environ)
  if framework == "jax" and not args.xla_cpu_default_scheduler:
    # XLA:CPU's default scheduler trades memory for concurrency; on these U-Nets it doubles the
    # buffer plan (mid grad: 965 -> 569 MB without it) at the same speed.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}", f"--configs={config}",
         f"--modes={mode}", f"--repeats={args.repeats}"] + (["--bf16"] if args.bf16 else []) + (
             ["--remat"] if args.remat and framework == "jax" else [])
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"{framework} {config} {mode} failed:\n{out.stderr[-3000:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="mid,sd15")
  parser.add_argument("--modes", default="forward,grad")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--remat", action="store_true", help="medjax remat (PyTorch: off)")
  parser.add_argument("--xla_cpu_default_scheduler", action="store_true",
                      help="keep XLA:CPU's concurrency-optimised scheduler (more memory)")
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  print(f"{'config':6} {'mode':8} {'medjax s':>9} {'torch s':>9} {'time x':>7} "
        f"{'medjax MB':>10} {'torch MB':>9} {'mem x':>6} {'xla plan MB':>11}  "
        f"(medjax compile+first s)")
  for config in args.configs.split(","):
    for mode in args.modes.split(","):
      j = spawn("jax", config, mode, args)
      p = spawn("torch", config, mode, args)
      print(f"{config:6} {mode:8} {j['median_s']:9.3f} {p['median_s']:9.3f} "
            f"{j['median_s'] / p['median_s']:7.2f} {j['peak_bytes'] / 2**20:10.0f} "
            f"{p['peak_bytes'] / 2**20:9.0f} {j['peak_bytes'] / p['peak_bytes']:6.2f} "
            f"{j['plan_bytes'] / 2**20:11.0f}  "
            f"({j['first_s']:.1f}) [{j['device']}]", flush=True)


if __name__ == "__main__":
  main()
