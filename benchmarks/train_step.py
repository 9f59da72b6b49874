"""Training step: medjax `trainer.setup(...).step` vs diffusers' PyTorch training scripts.

  python benchmarks/train_step.py                # tiny and mid: TI (8, 64 vectors), fine-tune
  python benchmarks/train_step.py --configs=mid --kinds=ft --repeats=5 --batch=2
  python benchmarks/train_step.py --configs=sd15         # SD1.5-sized random pipeline (heavy)
  python benchmarks/train_step.py --bf16                 # bf16 compute (GPU; slow on CPU)
  python benchmarks/train_step.py --remat                # medjax remat (PyTorch as is)
  python benchmarks/train_step.py --configs=mid --kinds=ti8 --loop   # + whole medjax.train loop
  python benchmarks/train_step.py --configs=sd15 --kinds=ft --bf16 --batch=8 --matmul_peak \
      --model_flops --pipeline_dir=/tmp/sd15    # GPU (benchmarks/gpu.sh): images/s and MFU

Step kinds:
  ti<N>  textual inversion with N vectors per token. medjax: `objective='textual_inversion'`,
         tokens '<x>=chest'. PyTorch: diffusers' examples/textual_inversion step: the whole
         `token_embedding` table trainable (AdamW), frozen U-Net/VAE (`requires_grad_(False)`),
         CLIP encoder/final norm/positions frozen, VAE encode without grad, CLIP forward,
         U-Net forward/backward, AdamW step, then every non-placeholder row restored from the
         original table. No grad clipping on either side (the script has none).
  ft     full U-Net fine-tune. medjax: `objective='unet'`. PyTorch: diffusers'
         examples/text_to_image/train_text_to_image.py step: VAE encode and text encoder
         without grad, U-Net forward/backward, grad-norm clipping at 1.0, AdamW step.
Both sides get a batch of images (medjax encodes them inside the jitted step, outside the
gradient) and token ids, sample latents from the VAE posterior, draw noise and timesteps and
regress epsilon with MSE; AdamW lr 1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8.

Configs (all random weights; both sides read the same weights):
  tiny  the embedded model (64^2 images): medjax `model.pretrained=''`; PyTorch loads its
        `save_pretrained` export.
  mid   benchmarks/unet.py's mid U-Net (64..256 channels, 768-wide cross attention) at 256^2
        images, a 4-layer 768-wide CLIP text encoder (real 49408-token vocabulary) and the test
        suite's tiny VAE, written as a diffusers directory.
  sd15  SD1.5's U-Net, VAE and CLIP sizes at 512^2 (heavy: GBs of memory, minutes per step on
        CPU; not run by default).

--loop also times the whole `trainer.train` loop (data pipeline, prefetch thread, host batches,
metrics at log steps, checkpoints and the non-finite check: everything but sample grids) on
the same config, with phantom images: two runs of N and N + repeats steps, each in a fresh
process sharing a persistent compilation cache, so (seconds(N + repeats) - seconds(N)) / repeats
is the loop's marginal time per step, compile and the final save cancelling out. Its ratio to
the bare jitted step (target <= 1.05) is what the loop costs on top of the step.

Each (framework, config, kind) runs in its own subprocess. Times are medians over `--repeats`
steps after `--warmup` steps (medjax's compile is reported separately). Memory on CPU is the
process's peak RSS while running the timed steps (reset after the warm-up; glibc keeps the heap
XLA's compiler freed, ~0.9 GB on mid fine-tune, unless `--malloc_trim` returns it to the OS
first, on both sides); on GPU peak device bytes. 'xla plan MB' is the buffer plan of medjax's
compiled step (`memory_analysis()`: arguments + outputs + temporaries - donated aliases).
PyTorch gets as many intra-op threads as the process may use (`os.sched_getaffinity`), which
is what XLA:CPU's thread pool uses. Ratios are medjax / PyTorch: below 1.0 means medjax is
faster or smaller. The load average before each run is printed: other processes on the machine
skew the times.

Throughput and MFU: images/s is batch / median step time. MFU = FLOPs per step / step time /
the device's dense bf16 peak (device_stats.PEAK_BF16_TFLOPS: 989.4 TFLOP/s on H100/H200 SXM;
`--peak_tflops` to override), the same FLOPs for both sides (the same work): XLA's cost
analysis of medjax's compiled step ('xla'; kernels XLA cannot see into, such as cuDNN's fused
attention, are left out), and with `--model_flops` also of the same step lowered on XLA:CPU
(attention as plain einsums, nothing hidden: 'model'; a CPU subprocess, run while the device
works). `--matmul_peak` also times a large bf16 matmul on the device and quotes MFU against it.
`--pipeline_dir` keeps the random diffusers directory there (written once, reused by later runs
and by benchmarks/sample.py); `--write_only` writes it and exits. `--timeout` bounds each
subprocess; `--json` writes every result.

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

RESOLUTION = pipelines.RESOLUTION
TOKEN, INIT_WORD = "<x>", "chest"
TI_PROMPT = "a chest x-ray of {}"
FT_PROMPT = "a chest x-ray with pleural effusion"
LR, BETAS, WEIGHT_DECAY, EPS = 1e-4, (0.9, 0.999), 1e-2, 1e-8
# The targets (medjax / PyTorch).
TIME_TARGET = {"ti": 0.8, "ft": 1.0}
MEM_TARGET = 0.8
LOOP_TARGET = 1.05  # the whole train loop per step / the bare jitted step


def num_threads() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def parse_kind(kind: str) -> tuple[str, int]:
  """'ti8' -> ('ti', 8); 'ft' -> ('ft', 0)."""
  if kind == "ft":
    return "ft", 0
  if kind.startswith("ti") and kind[2:].isdigit() and int(kind[2:]) > 0:
    return "ti", int(kind[2:])
  raise ValueError(f"step kind {kind!r}: expected 'ft' or 'ti<num_vectors>' (e.g. ti8)")


def images(batch: int, resolution: int):
  """The same images in [-1, 1] for both sides, NHWC."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(
      np.float32)


def run_steps(step, warmup: int, repeats: int, trim: bool = False) -> dict:
  """Warm-up steps (untimed), then the peak-RSS reset, then `repeats` timed steps."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  if trim:
    unet_bench.malloc_trim()
  unet_bench.reset_peak_host_bytes()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"first_s": first, "median_s": statistics.median(times), "times": times}


# -- medjax --------------------------------------------------------------------------------------

def run_jax(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from medjax import sharding, trainer  # pylint: disable=g-import-not-at-top

  kind, _ = parse_kind(args.kinds)
  config = jax_config(args)
  t0 = time.perf_counter()
  run = trainer.setup(config)
  setup_s = time.perf_counter() - t0
  prompt = TI_PROMPT.format(TOKEN) if kind == "ti" else FT_PROMPT
  batch = sharding.shard_batch({"image": images(args.batch, config.resolution),
                                "input_ids": run.sd.tokenize([prompt] * args.batch)}, run.mesh)
  t0 = time.perf_counter()
  compiled = run.step.lower(run.state, run.frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": run.state}

  def step():
    holder["state"], metrics = compiled(holder["state"], run.frozen, batch)
    jax.block_until_ready((holder["state"], metrics))
    holder["loss"] = float(metrics["loss"])

  out = run_steps(step, args.warmup, args.repeats, args.malloc_trim)
  device = jax.devices()[0]
  out["peak_bytes"] = device_stats.jax_peak_bytes(device, unet_bench.peak_host_bytes)
  out["flops"] = device_stats.xla_flops(compiled)
  if args.matmul_peak:
    out["matmul_tflops"] = device_stats.matmul_tflops()
  plan = compiled.memory_analysis()
  if plan is not None:
    out["plan"] = {k: int(getattr(plan, f"{k}_size_in_bytes")) for k in
                   ("argument", "output", "temp", "alias", "generated_code")}
    out["plan_bytes"] = (plan.argument_size_in_bytes + plan.output_size_in_bytes
                         + plan.temp_size_in_bytes - plan.alias_size_in_bytes)
  size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  out.update(setup_s=setup_s, compile_s=compile_s, loss=holder["loss"], device=device.platform,
             state_bytes=size(holder["state"]), frozen_bytes=size(run.frozen),
             device_kind=device.device_kind, jax=jax.__version__)
  return out


def run_jax_flops(args) -> dict:
  """FLOPs of medjax's step lowered (not compiled) on this process's backend (XLA:CPU when
  spawned by --model_flops): every matmul and convolution visible, attention included."""
  import jax  # pylint: disable=g-import-not-at-top

  from medjax import sharding, trainer  # pylint: disable=g-import-not-at-top

  from medjax.models import attention as attention_lib  # pylint: disable=g-import-not-at-top

  forced = "xla" in getattr(attention_lib, "IMPLEMENTATIONS", ())
  if forced:  # attention as einsums, so no kernel hides its FLOPs (nor a loop its trip count)
    fn = attention_lib.attention
    attention_lib.attention = lambda *a, **kw: fn(*a, **{**kw, "implementation": "xla"})
  kind, _ = parse_kind(args.kinds)
  config = jax_config(args)
  t0 = time.perf_counter()
  run = trainer.setup(config)
  prompt = TI_PROMPT.format(TOKEN) if kind == "ti" else FT_PROMPT
  batch = sharding.shard_batch({"image": images(args.batch, config.resolution),
                                "input_ids": run.sd.tokenize([prompt] * args.batch)}, run.mesh)
  lowered = run.step.lower(run.state, run.frozen, batch)
  return {"model_flops": device_stats.xla_flops(lowered), "backend": jax.default_backend(),
          "attention": "xla" if forced else "default", "seconds": time.perf_counter() - t0}


def jax_config(args):
  """The medjax train config of `--configs`/`--kinds` (the same for the bare step and the loop)."""
  from medjax import train_config  # pylint: disable=g-import-not-at-top

  kind, n = parse_kind(args.kinds)
  config = train_config.base_config()
  config.objective = "textual_inversion" if kind == "ti" else "unet"
  config.batch_size = args.batch
  config.resolution = RESOLUTION[args.configs]
  config.mixed_precision = "bf16" if args.bf16 else "fp32"
  config.remat = args.remat
  config.learning_rate = LR
  config.adam_b1, config.adam_b2 = BETAS
  config.weight_decay, config.adam_eps = WEIGHT_DECAY, EPS
  config.model.pretrained = "" if args.configs == "tiny" else args.path
  if kind == "ti":
    config.textual_inversion.tokens = ((TOKEN, INIT_WORD),)
    config.textual_inversion.num_vectors = n
    config.max_grad_norm = 0.0  # diffusers' textual_inversion.py does not clip
  else:
    config.max_grad_norm = 1.0
  return config


def run_jax_loop(args) -> dict:
  """`trainer.train` for `--loop_steps` steps in a fresh workdir; its summary's seconds."""
  from medjax import trainer  # pylint: disable=g-import-not-at-top

  config = jax_config(args)
  config.total_steps = args.loop_steps
  config.progress_bar = False
  config.sample.num_per_prompt = 0  # no sample grids: they are generation, not the loop
  config.checkpoint_every_steps = 10 ** 6  # one save, at the end (cancels out)
  config.data.phantoms.num = 64
  with tempfile.TemporaryDirectory() as workdir:
    summary = trainer.train(config, workdir)
  return {"seconds": summary["seconds"], "steps": summary["step"], "loss": summary["loss"]}


# -- driver --------------------------------------------------------------------------------------

def worker_cmd(framework: str, config: str, kind: str, path: str, args, extra=(),
               env=None) -> tuple[list[str], dict]:
  env = dict(os.environ, **(env or {}))
  if framework.startswith("jax") and not args.xla_cpu_default_scheduler:
    # As medjax.train does on CPU (see benchmarks/unet.py): the memory-lean XLA:CPU scheduler.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}",
         f"--configs={config}", f"--kinds={kind}", f"--path={path}", f"--batch={args.batch}",
         f"--warmup={args.warmup}", f"--repeats={args.repeats}", f"--threads={args.threads}"]
  cmd += ["--bf16"] if args.bf16 else []
  cmd += ["--malloc_trim"] if args.malloc_trim else []
  cmd += ["--remat"] if args.remat and framework.startswith("jax") else []
  cmd += ["--matmul_peak"] if args.matmul_peak and framework == "jax" else []
  return cmd + list(extra), env


def result_of(name: str, stdout: str, stderr: str, returncode: int) -> dict:
  """The worker's RESULT line, or {'error': ...} with its stderr's tail printed."""
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  print(f"{name} failed (exit {returncode}):\n{stderr[-3000:]}", flush=True)
  return {"error": f"exit {returncode}: {stderr.strip().splitlines()[-1:]}"}


def spawn(framework: str, config: str, kind: str, path: str, args, extra=(), env=None) -> dict:
  cmd, env = worker_cmd(framework, config, kind, path, args, extra, env)
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env,
                         timeout=args.timeout)
  except subprocess.TimeoutExpired:
    print(f"{framework} {config} {kind}: timeout after {args.timeout} s", flush=True)
    return {"error": f"timeout after {args.timeout} s"}
  return result_of(f"{framework} {config} {kind}", out.stdout, out.stderr, out.returncode)


def start_model_flops(config: str, kind: str, path: str, args) -> subprocess.Popen:
  """The XLA:CPU lowering of medjax's step in the background (no device, no compile), niced
  and on at most 4 CPUs so that it slows the timed workers as little as it can."""
  cmd, env = worker_cmd("jaxflops", config, kind, path, args,
                        env={"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})

  def lower_priority():
    os.nice(10)
    if hasattr(os, "sched_setaffinity"):
      os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:4])
  # Files, not pipes: nothing reads them until the end, and a full pipe would stall the child.
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env,
                          preexec_fn=lower_priority)
  proc.logs = (out, err)
  return proc


def finish_model_flops(proc: subprocess.Popen, wait_s: float) -> dict:
  try:
    proc.wait(timeout=wait_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    return {"error": f"model flops: no result within {wait_s:.0f} s of the step runs"}
  out, err = proc.logs
  out.seek(0)
  err.seek(0)
  return result_of("model flops", out.read(), err.read(), proc.returncode)


def loop_time(config: str, kind: str, path: str, args) -> tuple[float, list[dict]]:
  """Marginal seconds per step of `trainer.train`: runs of N and N + repeats steps."""
  base = args.warmup + 1
  with tempfile.TemporaryDirectory() as cache:
    env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    runs = [spawn("jaxloop", config, kind, path, args, [f"--loop_steps={n}"], env)
            for n in (base, base, base + args.repeats)]  # the first fills the cache
  runs = runs[1:]
  if any("error" in r for r in runs):
    raise RuntimeError(f"train loop {config} {kind} failed: {runs}")
  return (runs[1]["seconds"] - runs[0]["seconds"]) / args.repeats, runs


def verdict(ratio: float, target: float) -> str:
  return f"{'ok' if ratio <= target else 'MISS'}<={target:g}"


def write_json(path: str | None, details: list, loops: list) -> None:
  if path:
    with open(path, "w") as f:
      json.dump({"benchmark": "train_step", "rows": details, "loops": loops}, f, indent=1)


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="tiny,mid",
                      help="comma-separated: tiny, mid, sd15 (sd15 is heavy: not by default)")
  parser.add_argument("--kinds", default="ti8,ti64,ft",
                      help="comma-separated step kinds: ti<num_vectors> (textual inversion), "
                      "ft (U-Net fine-tune)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (>= 1)")
  parser.add_argument("--repeats", type=int, default=5, help="timed steps (median)")
  parser.add_argument("--threads", type=int, default=num_threads(),
                      help="torch.set_num_threads (default: the CPUs this process may use)")
  parser.add_argument("--bf16", action="store_true",
                      help="medjax mixed_precision='bf16'; PyTorch autocast bf16")
  parser.add_argument("--remat", action="store_true", help="medjax remat (PyTorch: off)")
  parser.add_argument("--xla_cpu_default_scheduler", action="store_true",
                      help="keep XLA:CPU's concurrency-optimised scheduler (more memory)")
  parser.add_argument("--malloc_trim", action="store_true",
                      help="both sides: glibc malloc_trim(0) before the peak-RSS reset, so freed "
                      "heap (medjax: XLA's compiler arenas) is not counted")
  parser.add_argument("--loop", action="store_true",
                      help="also time medjax's whole train loop against its bare step")
  parser.add_argument("--pipeline_dir", help="the random diffusers directory: read if there, "
                      "else written there and kept (one config)")
  parser.add_argument("--write_only", action="store_true",
                      help="write --pipeline_dir for --configs and exit")
  parser.add_argument("--matmul_peak", action="store_true",
                      help="also time a bf16 matmul on the device: MFU against it")
  parser.add_argument("--model_flops", action="store_true",
                      help="also count the step's FLOPs on XLA:CPU (attention as einsums)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (default: from its kind)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per subprocess")
  parser.add_argument("--json", help="write all results to this file")
  parser.add_argument("--loop_steps", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--worker", choices=["jax", "jaxflops", "jaxloop", "torch"],
                      help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.warmup < 1:
    parser.error("--warmup must be >= 1")
  if args.worker:
    if args.worker == "torch":
      import train_step_torch  # pylint: disable=g-import-not-at-top
      result = train_step_torch.run_torch(args)
    else:
      result = {"jax": run_jax, "jaxflops": run_jax_flops, "jaxloop": run_jax_loop}[args.worker](
          args)
    print("RESULT " + json.dumps(result))
    return 0
  configs = args.configs.split(",")
  for config in configs:
    if config not in RESOLUTION:
      parser.error(f"--configs: unknown config {config!r}")
  if args.pipeline_dir and len(configs) != 1:
    parser.error("--pipeline_dir holds one pipeline: give one --configs")
  if args.write_only:
    if not args.pipeline_dir:
      parser.error("--write_only needs --pipeline_dir")
    pipelines.ensure(configs[0], args.pipeline_dir)
    return 0
  kinds = args.kinds.split(",")
  for kind in kinds:
    parse_kind(kind)

  print(f"batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}"
        f"{', medjax remat' if args.remat else ''}"
        f"{', malloc_trim before RSS reset' if args.malloc_trim else ''}, median of "
        f"{args.repeats} steps after {args.warmup} warm-up, {args.threads} threads, load avg "
        "before each pair in []")
  header = (f"{'config':6} {'step':5} {'medjax s':>9} {'torch s':>9} {'time x':>7} "
            f"{'target':>9} {'medjax MB':>10} {'torch MB':>9} {'mem x':>6} {'target':>9} "
            f"{'xla plan MB':>11} {'compile s':>9}  load")
  print(header, flush=True)
  details, loops, failed = [], [], False
  for config in configs:
    with tempfile.TemporaryDirectory() as tmp:
      path = args.pipeline_dir or os.path.join(tmp, "pipe")
      pipelines.ensure(config, path)
      for kind in kinds:
        load = os.getloadavg()[0]
        flops_proc = (start_model_flops(config, kind, path, args) if args.model_flops
                      else None)
        j = spawn("jax", config, kind, path, args)
        p = spawn("torch", config, kind, path, args)
        if flops_proc is not None:  # an extra: its failure is noted, the row stands
          counted = finish_model_flops(flops_proc, 60.0)
          j["model_flops"] = counted.get("model_flops")
          if "error" in counted:
            j["model_flops_error"] = counted["error"]
        failed |= "error" in j or "error" in p
        peak = args.peak_tflops or device_stats.peak_bf16_tflops(j.get("device_kind", ""))
        t = device_stats.throughput(j, p, args.batch, peak)
        details.append({"config": config, "kind": kind, "batch": args.batch,
                        "dtype": "bf16" if args.bf16 else "fp32", "jax": j, "torch": p,
                        "throughput": t})
        write_json(args.json, details, loops)
        if "median_s" not in j or "median_s" not in p:
          continue
        tx = j["median_s"] / p["median_s"]
        mx = j["peak_bytes"] / p["peak_bytes"]
        print(f"{config:6} {kind:5} {j['median_s']:9.3f} {p['median_s']:9.3f} {tx:7.2f} "
              f"{verdict(tx, TIME_TARGET[parse_kind(kind)[0]]):>9} "
              f"{j['peak_bytes'] / 2**20:10.0f} {p['peak_bytes'] / 2**20:9.0f} {mx:6.2f} "
              f"{verdict(mx, MEM_TARGET):>9} {j.get('plan_bytes', 0) / 2**20:11.0f} "
              f"{j['compile_s']:9.1f}  [{load:.1f}] {j['device']}", flush=True)
        device_stats.print_throughput(f"{config:6} {kind:5}", t)
        if args.loop:
          per_step, runs = loop_time(config, kind, path, args)
          loops.append({"config": config, "kind": kind, "step_s": j["median_s"],
                        "loop_s": per_step, "runs": runs})
          write_json(args.json, details, loops)
  if loops:
    print(f"\nmedjax's whole train loop vs its bare jitted step (s/step; loop: marginal time of "
          f"{args.repeats} more steps):")
    for loop in loops:
      ratio = loop["loop_s"] / loop["step_s"]
      print(f"{loop['config']:6} {loop['kind']:5} step {loop['step_s']:.3f} loop "
            f"{loop['loop_s']:.3f} x{ratio:.3f} {verdict(ratio, LOOP_TARGET)}  (runs: "
            + ", ".join(f"{r['steps']} steps {r['seconds']:.1f} s" for r in loop["runs"]) + ")")
  print("\nmedjax XLA buffer plan (MB: arguments / outputs / temporaries / donated aliases), "
        "state and frozen params, losses, per-step times:")
  for row in details:
    j, p = row["jax"], row["torch"]
    if "median_s" not in j or "median_s" not in p:
      continue
    mb = {k: v / 2**20 for k, v in j.get("plan", {}).items()}
    print(f"{row['config']:6} {row['kind']:5} args {mb.get('argument', 0):.1f} "
          f"out {mb.get('output', 0):.1f} temp {mb.get('temp', 0):.1f} "
          f"alias {mb.get('alias', 0):.1f} | state {j['state_bytes'] / 2**20:.1f} "
          f"frozen {j['frozen_bytes'] / 2**20:.1f} | loss medjax {j['loss']:.4f} torch "
          f"{p['loss']:.4f} | medjax {[f'{t:.3f}' for t in j['times']]} torch "
          f"{[f'{t:.3f}' for t in p['times']]}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
