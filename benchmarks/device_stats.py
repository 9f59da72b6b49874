"""What the benchmarks read off a device: peak memory, XLA's FLOP count, the chip's peak rate.

Shared by unet.py, train_step.py and sample.py (each worker process imports it with jax or
torch already chosen). MFU = achieved FLOP/s / peak FLOP/s, with the FLOPs of one step from
XLA's cost analysis of the compiled program and the peak from the vendor's dense bf16 figure
for the device kind (`PEAK_BF16_TFLOPS`), or, relative to what the chip really does, from a
timed large bf16 matmul (`matmul_tflops`).
"""
import statistics
import time

# Dense (no sparsity) bf16 tensor-core peaks by the vendors' datasheets, TFLOP/s, matched as
# substrings of jax's `device_kind` / torch's device name (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),  # SXM; NVL (PCIe) parts are lower (835)
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v4", 275.0),
)


def peak_bf16_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def jax_peak_bytes(device, host_peak) -> int:
  """Peak device bytes on an accelerator (the allocator's peak since the process started),
  else `host_peak()` (peak RSS on CPU)."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return stats["peak_bytes_in_use"] if stats else host_peak()


def xla_flops(stage) -> float | None:
  """FLOPs of one call by XLA's cost analysis of a compiled (or lowered) program, or None.

  Work inside custom calls that XLA cannot see into (e.g. cuDNN fused attention, Pallas
  kernels) is not counted, so an MFU from it is a lower bound when such kernels run."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # unsupported by this backend
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def matmul_tflops(n: int | None = None, repeats: int = 10) -> float:
  """Measured bf16 matmul rate of jax's default device, TFLOP/s (median of `repeats` calls of
  a chain of 4 products, after a warm-up): the practical ceiling MFU is also quoted against.
  n: 8192 on accelerators, 1024 on CPU by default."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = n or (1024 if jax.default_backend() == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n ** 0.5

  @jax.jit
  def chain(x):
    for _ in range(4):
      x = x @ b
    return x
  chain(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    chain(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 4 * 2 * n ** 3 / statistics.median(times) / 1e12


def throughput(j: dict, p: dict, batch: int, peak_tflops: float | None) -> dict:
  """images/s, TFLOP/s and MFU of both sides from medjax's FLOP counts (the same work)."""
  out = {"peak_tflops": peak_tflops, "matmul_tflops": j.get("matmul_tflops")}
  for side, r in (("medjax", j), ("torch", p)):
    if "median_s" not in r:
      continue
    out[f"{side}_images_per_s"] = batch / r["median_s"]
    for name in ("flops", "model_flops"):
      if j.get(name):
        tflops = j[name] / r["median_s"] / 1e12
        out[f"{side}_{name}_tflops"] = tflops
        if peak_tflops:
          out[f"{side}_{name}_mfu"] = tflops / peak_tflops
        if j.get("matmul_tflops"):
          out[f"{side}_{name}_mfu_matmul"] = tflops / j["matmul_tflops"]
  return out


def print_throughput(label: str, t: dict) -> None:
  """Both sides' images/s, TFLOP/s and MFU (xla and, if counted, model FLOPs) of `throughput`."""
  pct = lambda key: f"{100 * t[key]:5.1f}%" if t.get(key) is not None else "    -"
  num = lambda key, spec: format(t[key], spec) if t.get(key) is not None else "-"
  for side in ("medjax", "torch"):
    print(f"{label} {side:6} {num(f'{side}_images_per_s', '8.2f'):>8} img/s  "
          f"xla {num(f'{side}_flops_tflops', '7.1f'):>7} TFLOP/s MFU {pct(f'{side}_flops_mfu')} "
          f"(matmul {pct(f'{side}_flops_mfu_matmul')})  model "
          f"{num(f'{side}_model_flops_tflops', '7.1f'):>7} TFLOP/s MFU "
          f"{pct(f'{side}_model_flops_mfu')} (matmul {pct(f'{side}_model_flops_mfu_matmul')})")
