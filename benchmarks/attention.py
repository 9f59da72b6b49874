"""Attention alone: medjax's implementations vs torch's scaled_dot_product_attention, same run.

  python benchmarks/attention.py                           # every case, forward + backward
  python benchmarks/attention.py --cases=sd15 --modes=forward --repeats=5
  python benchmarks/attention.py --block_q=64,128,256      # sweep 'blocked' query blocks
  python benchmarks/attention.py --block_k=512,1024        # ... or key blocks
  python benchmarks/attention.py --dtype=bf16              # on a GPU: cudnn joins in
  python benchmarks/attention.py --bound                   # + a lower bound for XLA (CPU)

Inputs are [B, T, H*D] as the models hold them, so every time includes the head split and the
layout changes each implementation needs. 'backward' times the gradient of sum(out * w) with
respect to q, k and v (forward included, as in training). Times are medians over `--repeats`
calls after two warm-up calls (JAX compiles in the first). Ratios are medjax / torch: below
1.0 means medjax is faster. 'plan MB' is XLA's buffer plan of the compiled call (arguments,
outputs and temporaries): the T x T logits show up there. The load average before the run is
printed: other processes on the machine skew the times.

`--bound` (fp32, CPU) adds the least time any attention built from XLA's kernels could take on
this machine: the case's matmul FLOPs at the fastest rate XLA reaches here (a 2048^3 fp32 matmul)
plus one `exp` per logit at XLA's fastest exp rate (a cache-resident block, fused with its sum),
and that bound's ratio to torch SDPA. Forward: 4 B H Tq Tk D FLOPs; backward (which includes
the forward): 12 B H Tq Tk D, what an implementation that keeps the softmax needs (flash
attention recomputes it: 14 and two exps). Where bound / torch exceeds a target ratio, no
kernel made of XLA ops reaches that target on this machine.
"""
import argparse
import os
import statistics
import sys
import time

# Runnable from a checkout without installing medjax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {
    # name: (batch, tokens, heads, head_dim, key tokens or None for self-attention)
    "mid": (1, 1024, 8, 8, None),        # mid U-Net, 32x32 latents, 64 channels
    "t1024": (1, 1024, 8, 16, None),     # issue 16's measurement
    "sd15": (1, 4096, 8, 40, None),      # SD1.5 at 512 px: 64x64 latents, 320 channels
    "sd15_cross": (1, 4096, 8, 40, 77),  # its cross-attention to the text
    "vae512": (1, 4096, 1, 512, None),   # the VAE's mid-block at 512 px
}


def _median_seconds(fn, repeats: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_jax(case, mode: str, dtype: str, implementation: str, repeats: int,
             block_q: int | None = None, block_k: int | None = None) -> tuple[float, float]:
  """(seconds, XLA buffer plan in MB) of medjax's attention on `case`."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from medjax.models import attention as attention_lib

  b, t, h, d, tk = case
  tk = tk or t
  rng = np.random.default_rng(0)
  jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jdt)
  q, k, v, w = arr(b, t, h * d), arr(b, tk, h * d), arr(b, tk, h * d), arr(b, t, h * d)
  if block_q is None and block_k is None:
    attend = functools.partial(attention_lib.attention, num_heads=h,
                               implementation=implementation)
  else:  # the blocked kernel with other block sizes, same layout changes as `attention`
    def attend(q, k, v):
      split = lambda x: x.reshape(b, x.shape[1], h, d).transpose(0, 2, 1, 3)
      out = attention_lib.blocked_attention(
          split(q), split(k), split(v), block_q=block_q or attention_lib.BLOCK_Q,
          block_k=block_k)
      return out.transpose(0, 2, 1, 3).reshape(b, t, h * d)
  if mode == "forward":
    fn = jax.jit(attend)
  else:
    fn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * w),
                          argnums=(0, 1, 2)))
  compiled = fn.lower(q, k, v).compile()
  plan = compiled.memory_analysis()
  plan_mb = float("nan") if plan is None else (
      plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes) / 1e6
  run = lambda: jax.block_until_ready(compiled(q, k, v))
  return _median_seconds(run, repeats), plan_mb


def xla_rates(repeats: int = 20) -> tuple[float, float]:
  """(fp32 matmul FLOP/s, exp/s): the fastest rates XLA reaches on this machine, best of
  `repeats`: a 2048^3 matmul, and exp of a cache-resident [8, 128, 256] block fused with its row
  sum, 64 blocks per call in a loop (so the exp is not hoisted or fused into a matmul)."""
  import jax
  import jax.numpy as jnp

  def best(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return min(times)

  a = jnp.full((2048, 2048), 0.5, jnp.float32)
  matmul = 2 * 2048 ** 3 / best(jax.jit(lambda a: a @ a), a)
  block, shifts = jnp.full((8, 128, 256), 0.5, jnp.float32), jnp.linspace(0.0, 1.0, 64)
  exp_sum = jax.jit(lambda x, c: jax.lax.map(lambda ci: jnp.exp(x - ci).sum(-1), c))
  return matmul, block.size * shifts.size / best(exp_sum, block, shifts)


def lower_bound_seconds(case, mode: str, rates: tuple[float, float]) -> float:
  """Matmul FLOPs at XLA's fastest matmul rate plus one exp per logit at its fastest exp rate."""
  b, t, h, d, tk = case
  logits = b * h * t * (tk or t)
  flops = (4 if mode == "forward" else 12) * logits * d
  return flops / rates[0] + logits / rates[1]


def time_torch(case, mode: str, dtype: str, repeats: int) -> float:
  import torch
  import torch.nn.functional as F

  b, t, h, d, tk = case
  tk = tk or t
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
  gen = torch.Generator().manual_seed(0)
  arr = lambda *shape: torch.randn(*shape, generator=gen).to(device, tdt)
  q, k, v, w = arr(b, t, h * d), arr(b, tk, h * d), arr(b, tk, h * d), arr(b, t, h * d)
  if mode == "backward":
    for x in (q, k, v):
      x.requires_grad_(True)

  def attend():  # diffusers' AttnProcessor2_0: split heads, SDPA, merge heads
    split = lambda x: x.view(b, -1, h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, t, h * d)

  def run():
    if mode == "forward":
      with torch.no_grad():
        attend()
    else:
      torch.autograd.grad((attend().float() * w.float()).sum(), (q, k, v))
    if device == "cuda":
      torch.cuda.synchronize()

  return _median_seconds(run, repeats)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--modes", default="forward,backward")
  parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
  parser.add_argument("--implementations", default=None,
                      help="medjax implementations (default: xla,blocked; + cudnn on GPU)")
  parser.add_argument("--block_q", default="", help="also time 'blocked' with these blocks")
  parser.add_argument("--block_k", default="", help="... and with these key blocks")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--bound", action="store_true",
                      help="add XLA's lower bound per case (fp32 on CPU; see the docstring)")
  args = parser.parse_args(argv)

  import jax
  import torch

  on_gpu = jax.default_backend() == "gpu"
  impls = (args.implementations or ("xla,blocked,cudnn" if on_gpu else "xla,blocked")).split(",")
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}, "
        f"{args.dtype}, load average {os.getloadavg()[0]:.2f}")
  header = f"{'case':<11} {'mode':<8} {'medjax':<13} {'medjax ms':>9} {'plan MB':>8} " \
           f"{'torch ms':>9} {'ratio':>6}"
  rates = None
  if args.bound:
    rates = xla_rates()
    header += f" {'bound ms':>9} {'bound/torch':>11}"
    print(f"XLA on this machine: fp32 matmul {rates[0] / 1e9:.0f} GFLOP/s, "
          f"exp {rates[1] / 1e9:.2f} G/s (fastest of 20 calls each)")
  print(header)
  print("-" * len(header))
  blocks = [(int(x), None) for x in args.block_q.split(",") if x]
  blocks += [(None, int(x)) for x in args.block_k.split(",") if x]
  for name in args.cases.split(","):
    case = CASES[name]
    for mode in args.modes.split(","):
      torch_s = time_torch(case, mode, args.dtype, args.repeats)
      variants = [(impl, (None, None)) for impl in impls] + [("blocked", b) for b in blocks]
      for impl, (bq, bk) in variants:
        label = impl if bq is bk is None else f"blocked/q{bq}" if bq else f"blocked/k{bk}"
        try:
          seconds, plan_mb = time_jax(case, mode, args.dtype, impl, args.repeats, bq, bk)
        except Exception as e:  # e.g. cudnn refusing a shape: say so and go on
          print(f"{name:<11} {mode:<8} {label:<13} failed: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:80]}")
          continue
        bound = ""
        if rates:
          bound_s = lower_bound_seconds(case, mode, rates)
          bound = f" {bound_s * 1e3:9.2f} {bound_s / torch_s:11.2f}"
        print(f"{name:<11} {mode:<8} {label:<13} {seconds * 1e3:9.2f} {plan_mb:8.1f} "
              f"{torch_s * 1e3:9.2f} {seconds / torch_s:6.2f}{bound}", flush=True)


if __name__ == "__main__":
  main()
