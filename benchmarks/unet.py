"""U-Net forward and gradient step: medjax (JAX) vs diffusers (PyTorch), same config, same run.

  python benchmarks/unet.py                      # mid and sd15 configs, forward + grad
  python benchmarks/unet.py --configs=mid --modes=forward --repeats=5
  python benchmarks/unet.py --bf16               # bf16 compute (GPU; slow on CPU)
  python benchmarks/unet.py --remat              # medjax with rematerialised blocks (PyTorch as is)
  python benchmarks/unet.py --configs=sd15 --batch=8 --bf16 --torch_compile   # GPU (gpu.sh)

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

`--torch_compile` adds a third side, the diffusers U-Net under `torch.compile` (default mode;
its first call, which compiles, is the warm-up); `--sides` picks the sides to run (e.g.
`--sides=torch_compile` alone, as benchmarks/gpu.sh does late in its budget). `--timeout` bounds
each subprocess (a side that runs past it is reported as a timeout and the rest go on);
`--json` writes every result (rewritten after each row, so a killed run keeps what finished).
`--rounds=N` runs each side N times in alternating order and reports medians over the rounds
and each round's time ratio: on a shared or throttling machine the speed drifts between the
processes of one run, and one round can land on either side of a target.
Both sides keep fp32 params: `--bf16` is medjax `dtype=bfloat16` and PyTorch autocast(bf16),
whose attention is diffusers' default processor (PyTorch SDPA).

On a GPU, `bash benchmarks/gpu.sh` runs unet.py, train_step.py and sample.py (and more) at the
SD1.5 shape in bf16, batch 8, in under 8 minutes, and prints one summary table (its header
says what it prints and how its budget is spent).
"""
import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# Runnable from a checkout without installing medjax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import device_stats  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = {
    # block_out_channels, latent size, cross-attention width, heads (SD1 style: 8 heads)
    "tiny": dict(block_out_channels=[32, 32, 64, 64], latent=16, cross_attention_dim=64),
    "mid": dict(block_out_channels=[64, 128, 256, 256], latent=32, cross_attention_dim=768),
    "sd15": dict(block_out_channels=[320, 640, 1280, 1280], latent=64, cross_attention_dim=768),
}
SIDES = ("jax", "torch", "torch_compile")


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


def malloc_trim() -> None:
  """Returns freed glibc heap (e.g. XLA's compiler arenas) to the OS, so RSS drops to what is
  in use."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def timed(fn, repeats, trim: bool = False):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  if trim:
    malloc_trim()
  reset_peak_host_bytes()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def random_params(unet, seed: int):
  """Random U-Net params: pipeline.init_params on CPU (as before); on accelerators the same
  kinds drawn in float32 (its float64 draw of SD1.5's 860M params costs ~10 s per process)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from medjax import pipeline  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "cpu":
    return pipeline.init_params(unet, seed)
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(pipeline.param_shapes(unet))
  params = {}
  for path, leaf in flat.items():
    if path[-1] in ("kernel", "embedding"):
      value = rng.standard_normal(leaf.shape, dtype=np.float32)
      value *= 0.02 if path[-1] == "embedding" else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = (np.ones if path[-1] == "scale" else np.zeros)(leaf.shape, np.float32)
    params[path] = jax.device_put(value)
  return flax.traverse_util.unflatten_dict(params)


def run_jax(config_name, mode, repeats, bf16, remat, batch, attention="auto", trim=False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from medjax.models import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  cfg = CONFIGS[config_name]
  unet = UNet2DConditionModel.from_config(
      unet_config(config_name), dtype=jnp.bfloat16 if bf16 else jnp.float32, remat=remat,
      attention=attention)
  params = random_params(unet, 0)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (batch, cfg["latent"], cfg["latent"], 4))
  c = jax.random.normal(k2, (batch, 77, cfg["cross_attention_dim"]))
  target = jax.random.normal(k3, x.shape)
  t = jnp.full((batch,), 500, jnp.int32)

  t0 = time.perf_counter()
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
  compile_s = time.perf_counter() - t0
  first, median = timed(fn, repeats, trim)
  device = jax.devices()[0]
  plan = compiled.memory_analysis()
  plan_bytes = (plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
                - plan.alias_size_in_bytes) if plan else 0
  return dict(first_s=first, median_s=median, plan_bytes=plan_bytes,
              peak_bytes=device_stats.jax_peak_bytes(device, peak_host_bytes),
              device=str(device.platform), compile_s=compile_s, device_kind=device.device_kind,
              flops=device_stats.xla_flops(compiled), jax=jax.__version__)


def run_torch(config_name, mode, repeats, bf16, remat, batch, compile_model=False,
              trim=False):
  del remat  # the issue's memory target allows remat on the medjax side only
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top

  cfg = CONFIGS[config_name]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  with torch.device(device):  # built on the device: SD1.5's init on the host takes ~10 s
    unet = UNet2DConditionModel(**unet_config(config_name))
  x = torch.randn(batch, 4, cfg["latent"], cfg["latent"], device=device)
  c = torch.randn(batch, 77, cfg["cross_attention_dim"], device=device)
  target = torch.randn_like(x)
  t = torch.full((batch,), 500, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
  model = torch.compile(unet) if compile_model else unet

  if mode == "forward":
    unet.eval()

    def fn():
      with torch.no_grad(), autocast:
        model(x, t, c).sample
      sync()
  else:
    unet.train()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-4)

    def fn():
      opt.zero_grad(set_to_none=True)
      with autocast:
        loss = torch.mean((model(x, t, c).sample.float() - target) ** 2)
      loss.backward()
      opt.step()
      sync()
  first, median = timed(fn, repeats, trim)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_host_bytes()
  return dict(first_s=first, median_s=median, peak_bytes=peak, device=device,
              device_kind=torch.cuda.get_device_name() if device == "cuda" else "cpu",
              torch=torch.__version__)


def worker(args):
  common = (args.configs, args.modes, args.repeats, args.bf16, args.remat, args.batch)
  if args.worker == "jax":
    result = run_jax(*common, attention=args.attention, trim=args.malloc_trim)
  else:
    result = run_torch(*common, compile_model=args.worker == "torch_compile",
                       trim=args.malloc_trim)
  print("RESULT " + json.dumps(result))


def spawn(framework, config, mode, args) -> dict:
  """One side in its own process: its result, or {'error': ...} (failure or timeout)."""
  env = dict(os.environ)
  if framework == "jax" and not args.xla_cpu_default_scheduler:
    # XLA:CPU's default scheduler trades memory for concurrency; on these U-Nets it doubles the
    # buffer plan (mid grad: 965 -> 569 MB without it) at the same speed.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}", f"--configs={config}",
         f"--modes={mode}", f"--repeats={args.repeats}", f"--batch={args.batch}"]
  cmd += ["--bf16"] if args.bf16 else []
  cmd += ["--malloc_trim"] if args.malloc_trim else []
  cmd += ["--remat"] if args.remat and framework == "jax" else []
  cmd += [f"--attention={args.attention}"] if framework == "jax" else []
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                         timeout=args.timeout)
  except subprocess.TimeoutExpired:
    print(f"{framework} {config} {mode}: timeout after {args.timeout} s", flush=True)
    return {"error": f"timeout after {args.timeout} s"}
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
      result["wall_s"] = time.perf_counter() - start
      return result
  print(f"{framework} {config} {mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}",
        flush=True)
  return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}


def ratio(a: dict, b: dict, key: str) -> float | None:
  return a[key] / b[key] if key in a and key in b and b[key] else None


def spawn_rounds(sides, config, mode, args) -> tuple[dict, list[float]]:
  """Each side `args.rounds` times, in alternating order (a machine whose speed drifts by tens
  of percent over minutes then tilts neither side): per side the first round's result with
  median_s and peak_bytes the median over rounds (`rounds_s` lists them), and the medjax /
  PyTorch time ratio of each round."""
  rounds = []
  for r in range(args.rounds):
    order = sides if r % 2 == 0 else sides[::-1]
    rounds.append({s: spawn(s, config, mode, args) for s in order})
  res = {}
  for s in sides:
    ok = [r[s] for r in rounds if "error" not in r[s]]
    res[s] = dict(ok[0]) if ok else rounds[0][s]
    for key in ("median_s", "peak_bytes"):
      if len(ok) > 1 and all(key in r for r in ok):
        res[s][key] = statistics.median(r[key] for r in ok)
    if ok:
      res[s]["rounds_s"] = [r["median_s"] for r in ok]
  per_round = [ratio(r["jax"], r["torch"], "median_s") for r in rounds
               if "jax" in r and "torch" in r]
  return res, [x for x in per_round if x is not None]


def fmt(value, spec: str, width: int) -> str:
  return format(value, spec) if value is not None else "-".rjust(width)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="mid,sd15", help="comma-separated: tiny, mid, sd15")
  parser.add_argument("--modes", default="forward,grad")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bf16", action="store_true")
  parser.add_argument("--remat", action="store_true", help="medjax remat (PyTorch: off)")
  parser.add_argument("--attention", default="auto",
                      help="medjax's attention implementation (medjax/models/attention.py)")
  parser.add_argument("--sides", default="jax,torch", help=f"comma-separated: {', '.join(SIDES)}")
  parser.add_argument("--torch_compile", action="store_true",
                      help="also the PyTorch side under torch.compile (adds it to --sides)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per side (subprocess)")
  parser.add_argument("--json", help="write all results to this file")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run each side this many times, alternating; report medians and "
                           "the range of the per-round time ratios")
  parser.add_argument("--xla_cpu_default_scheduler", action="store_true",
                      help="keep XLA:CPU's concurrency-optimised scheduler (more memory)")
  parser.add_argument("--malloc_trim", action="store_true",
                      help="both sides: glibc malloc_trim(0) before the peak-RSS reset, so freed "
                           "heap (XLA's compiler arenas) is not counted")
  parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  sides = [s for s in args.sides.split(",") if s]
  if args.torch_compile and "torch_compile" not in sides:
    sides.append("torch_compile")
  for name in sides:
    if name not in SIDES:
      parser.error(f"--sides: unknown side {name!r}; expected some of {', '.join(SIDES)}")
  for config in args.configs.split(","):
    if config not in CONFIGS:
      parser.error(f"--configs: unknown config {config!r}; expected some of {', '.join(CONFIGS)}")
  print(f"batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}, sides {','.join(sides)}")
  print(f"{'config':6} {'mode':8} {'medjax s':>9} {'torch s':>9} {'time x':>7} "
        f"{'medjax MB':>10} {'torch MB':>9} {'mem x':>6} {'xla plan MB':>11}  "
        f"(medjax compile s + first call s)"
        + ("  tcompile s  x tc" if "torch_compile" in sides else "")
        + ("  time x per round" if args.rounds > 1 else ""))
  rows, failed = [], False
  for config in args.configs.split(","):
    for mode in args.modes.split(","):
      res, per_round = spawn_rounds(sides, config, mode, args)
      failed |= any("error" in r for r in res.values())
      j, p, pc = (res.get(s, {}) for s in SIDES)
      mb = lambda r: r["peak_bytes"] / 2**20 if "peak_bytes" in r else None
      line = (f"{config:6} {mode:8} {fmt(j.get('median_s'), '9.3f', 9)} "
              f"{fmt(p.get('median_s'), '9.3f', 9)} {fmt(ratio(j, p, 'median_s'), '7.2f', 7)} "
              f"{fmt(mb(j), '10.0f', 10)} {fmt(mb(p), '9.0f', 9)} "
              f"{fmt(ratio(j, p, 'peak_bytes'), '6.2f', 6)} "
              f"{fmt(j['plan_bytes'] / 2**20 if 'plan_bytes' in j else None, '11.0f', 11)}  "
              f"({fmt(j.get('compile_s'), '.1f', 1)} + {fmt(j.get('first_s'), '.1f', 1)}) "
              f"[{j.get('device', p.get('device', '-'))}]")
      if "torch_compile" in sides:
        line += (f"  {fmt(pc.get('median_s'), '9.3f', 9)} "
                 f"{fmt(ratio(j, pc, 'median_s'), '7.2f', 7)}")
      if args.rounds > 1:
        line += "  " + " ".join(f"{x:.2f}" for x in per_round)
      print(line, flush=True)
      rows.append(dict(config=config, mode=mode, batch=args.batch,
                       dtype="bf16" if args.bf16 else "fp32", remat=args.remat,
                       time_ratio_per_round=per_round, **res))
      if args.json:
        with open(args.json, "w") as f:
          json.dump({"benchmark": "unet", "rows": rows}, f, indent=1)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
