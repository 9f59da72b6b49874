"""Per-module timings: medjax's Flax blocks vs the diffusers (PyTorch) modules, same weights.

  python benchmarks/modules.py                               # mid U-Net shapes, forward + grad
  python benchmarks/modules.py --modules=resnet,gn_silu --sizes=32 --modes=grad
  python benchmarks/modules.py --configs=sd15 --modules=resnet --json=out.json
  python benchmarks/modules.py --modules=all               # + attn1, attn2, ff (transformer parts)
  taskset -c 1 python benchmarks/modules.py --threads=1 --clock=cpu   # one core of a busy machine

Each U-Net config of benchmarks/unet.py is broken into the module instances its forward runs
(every distinct kind and shape, with how many times the U-Net runs it: `n`), so `n x (medjax -
torch)` says where the whole-U-Net gap comes from; the summary adds up the top-level kinds
(resnet, transformer, downsample, upsample, concat) per mode. Rows marked
'in <kind>' are parts of another row (gn_silu inside resnet, btb/geglu/attn/ff/layernorm inside
transformer) and are not added again.

medjax modules are jitted (ahead-of-time compiled; compile not timed) and fed the same weights as
the diffusers module (seeded construction, converted by medjax.convert.diffusers' name map);
`max|diff|` is the largest difference of the output (forward) or of every gradient (grad),
relative to the largest reference value. grad = the gradient of sum(out * g) for a fixed random g
w.r.t. the params and the differentiable inputs (x; temb for resnets; not the text), as a U-Net
training step needs. Times are medians over at least --repeats calls and --min_time seconds after
a warm-up call, batch 1, fp32. One medjax call carries JAX's dispatch overhead (printed: an empty
jitted call), which the whole jitted U-Net pays once, not per module. Each (config, kind) runs
jax then torch in their own subprocesses, with the XLA:CPU flags of benchmarks/unet.py and
torch on all CPUs this process may use; the load average before each pair is printed.
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step as train_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

HEADS, GROUPS, RESNET_EPS, TEXT_LEN = 8, 32, 1e-5, 77
# kind -> the kind it is part of (None: top level, added up in the summary).
KINDS = {"resnet": None, "transformer": None, "downsample": None, "upsample": None,
         "concat": None, "gn_silu": "resnet", "btb": "transformer", "geglu": "transformer",
         "attn1": "transformer", "attn2": "transformer", "ff": "transformer",
         "layernorm": "transformer"}
DEFAULT_KINDS = "resnet,transformer,gn_silu,btb,geglu,layernorm,downsample,upsample,concat"


def unet_instances(config_name: str) -> dict[tuple[str, tuple[int, ...]], int]:
  """(kind, shape) -> how often the U-Net of `config_name` runs it (mirrors medjax/diffusers)."""
  cfg = unet_bench.unet_config(config_name)
  ch, size, layers_per_block = cfg["block_out_channels"], cfg["sample_size"], cfg[
      "layers_per_block"]
  n = len(ch)
  items = collections.Counter()

  def resnet(cin, cout, h):
    items[("resnet", (cin, cout, h))] += 1
    items[("gn_silu", (cin, h))] += 1
    items[("gn_silu", (cout, h))] += 1

  def transformer(c, h):
    for kind in ("transformer", "btb", "geglu", "attn1", "attn2", "ff"):
      items[(kind, (c, h))] += 1
    items[("layernorm", (c, h))] += 3  # norm1..3 of the transformer block

  h, x = size, ch[0]
  skips = [(x, h)]
  for i, kind in enumerate(cfg["down_block_types"]):
    for _ in range(layers_per_block):
      resnet(x, ch[i], h)
      x = ch[i]
      if kind.startswith("CrossAttn"):
        transformer(x, h)
      skips.append((x, h))
    if i < n - 1:
      items[("downsample", (x, h))] += 1
      h //= 2
      skips.append((x, h))
  resnet(x, x, h)
  transformer(x, h)
  resnet(x, x, h)
  for i, kind in enumerate(cfg["up_block_types"]):
    out = ch[n - 1 - i]
    for _ in range(layers_per_block + 1):
      skip_c, _ = skips.pop()
      items[("concat", (x, skip_c, h))] += 1
      resnet(x + skip_c, out, h)
      x = out
      if kind.startswith("CrossAttn"):
        transformer(x, h)
    if i < n - 1:
      items[("upsample", (x, h))] += 1
      h *= 2
  items[("gn_silu", (ch[0], size))] += 1  # conv_norm_out
  return dict(items)


def shape_str(kind: str, shape: tuple[int, ...]) -> str:
  if kind == "resnet":
    return f"{shape[0]}->{shape[1]} @{shape[2]}"
  if kind == "concat":
    return f"{shape[0]}+{shape[1]} @{shape[2]}"
  return f"{shape[0]} @{shape[1]}"


# -- the modules on both sides -------------------------------------------------------------------

def torch_module(kind: str, shape: tuple[int, ...], config_name: str):
  """The diffusers module (seeded, so both workers build the same weights) and its inputs."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.models import attention as d_attention  # pylint: disable=g-import-not-at-top
  from diffusers.models import attention_processor  # pylint: disable=g-import-not-at-top
  from diffusers.models import resnet as d_resnet  # pylint: disable=g-import-not-at-top
  from diffusers.models.transformers import transformer_2d  # pylint: disable=g-import-not-at-top

  cfg = unet_bench.unet_config(config_name)
  temb_c, text_c = 4 * cfg["block_out_channels"][0], cfg["cross_attention_dim"]
  torch.manual_seed(0)
  c, h = shape[-2] if kind in ("resnet", "concat") else shape[0], shape[-1]
  gen = torch.Generator().manual_seed(1)
  rand = lambda *s: torch.randn(*s, generator=gen)
  tokens, text = rand(1, h * h, c), rand(1, TEXT_LEN, text_c)

  class GroupNormSiLU(torch.nn.Module):
    def __init__(self, channels):
      super().__init__()
      self.norm = torch.nn.GroupNorm(GROUPS, channels, eps=RESNET_EPS)

    def forward(self, x):
      return torch.nn.functional.silu(self.norm(x))

  class Concat(torch.nn.Module):
    def forward(self, x, skip):
      return torch.cat([x, skip], dim=1)

  # (module, inputs, which inputs are differentiated, forward callable)
  if kind == "resnet":
    m = d_resnet.ResnetBlock2D(in_channels=shape[0], out_channels=shape[1], temb_channels=temb_c,
                               groups=GROUPS, eps=RESNET_EPS)
    return m, [rand(1, shape[0], h, h), rand(1, temb_c)], 2, lambda x, t: m(x, t)
  if kind == "transformer":
    m = transformer_2d.Transformer2DModel(HEADS, c // HEADS, in_channels=c, num_layers=1,
                                          cross_attention_dim=text_c, norm_num_groups=GROUPS)
    return m, [rand(1, c, h, h), text], 1, lambda x, e: m(x, e, return_dict=False)[0]
  if kind == "btb":
    m = d_attention.BasicTransformerBlock(c, HEADS, c // HEADS, cross_attention_dim=text_c)
    return m, [tokens, text], 1, lambda x, e: m(x, encoder_hidden_states=e)
  if kind in ("attn1", "attn2"):
    cross = kind == "attn2"
    m = attention_processor.Attention(c, text_c if cross else None, heads=HEADS,
                                      dim_head=c // HEADS)
    if cross:
      return m, [tokens, text], 1, lambda x, e: m(x, encoder_hidden_states=e)
    return m, [tokens], 1, m
  if kind == "geglu":
    m = d_attention.GEGLU(c, 4 * c)
    return m, [tokens], 1, m
  if kind == "ff":
    m = d_attention.FeedForward(c, activation_fn="geglu")
    return m, [tokens], 1, m
  if kind == "layernorm":
    m = torch.nn.LayerNorm(c, eps=1e-5)
    return m, [tokens], 1, m
  if kind == "gn_silu":
    m = GroupNormSiLU(c)
    return m, [rand(1, c, h, h)], 1, m
  if kind == "downsample":
    m = d_resnet.Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="conv")
    return m, [rand(1, c, h, h)], 1, m
  if kind == "upsample":
    m = d_resnet.Upsample2D(c, use_conv=True, out_channels=c)
    return m, [rand(1, c, h, h)], 1, m
  if kind == "concat":
    m = Concat()
    return m, [rand(1, shape[0], h, h), rand(1, shape[1], h, h)], 2, m
  raise ValueError(f"unknown module kind {kind!r}")


def jax_module(kind: str, shape: tuple[int, ...], attention: str):
  """The medjax module computing what `torch_module(kind, shape)` does (NHWC / tokens)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from medjax.models import layers  # pylint: disable=g-import-not-at-top

  class GroupNormSiLU(nn.Module):
    """What ResnetBlock2D does to its input before conv1."""

    @nn.compact
    def __call__(self, x):
      return nn.silu(layers.group_norm(GROUPS, RESNET_EPS, "norm",
                                       **layers.norm_kwargs(jnp.float32))(x))

  class Concat(nn.Module):
    @nn.compact
    def __call__(self, x, skip):
      return jnp.concatenate([x, skip], axis=-1)

  c = shape[-2] if kind in ("resnet", "concat") else shape[0]
  impl = dict(implementation=attention)
  return {
      "resnet": lambda: layers.ResnetBlock2D(shape[1], GROUPS, RESNET_EPS),
      "transformer": lambda: layers.Transformer2DModel(HEADS, c // HEADS, 1, GROUPS, **impl),
      "btb": lambda: layers.BasicTransformerBlock(HEADS, c // HEADS, **impl),
      "attn1": lambda: layers.Attention(HEADS, c // HEADS, **impl),
      "attn2": lambda: layers.Attention(HEADS, c // HEADS, **impl),
      "geglu": lambda: layers.GEGLU(4 * c),
      "ff": lambda: layers.FeedForward(),
      "layernorm": lambda: layers.layer_norm(1e-5, "norm"),
      "gn_silu": GroupNormSiLU,
      "downsample": lambda: layers.Downsample2D(c, 1),
      "upsample": lambda: layers.Upsample2D(c),
      "concat": Concat,
  }[kind]()


def to_jax_layout(t):
  """A torch tensor as NumPy, NCHW -> NHWC."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a = t.detach().numpy()
  return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1))) if a.ndim == 4 else a


# -- workers -------------------------------------------------------------------------------------

def worker_torch(kind, shape, config_name, modes, args):
  import torch  # pylint: disable=g-import-not-at-top
  module, inputs, num_diff, call = torch_module(kind, shape, config_name)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  module.to(device)
  inputs = [x.to(device) for x in inputs]
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out = {}
  for mode in modes:
    if mode == "forward":
      module.eval()

      def fn():
        with torch.no_grad():
          call(*inputs)
        sync()
    else:
      module.train()
      diff = [x.requires_grad_(True) for x in inputs[:num_diff]]
      g = torch.randn(call(*inputs).shape, generator=torch.Generator().manual_seed(2)).to(device)
      params = list(module.parameters())

      def fn(leaves=params + diff, g=g):
        for t in leaves:
          t.grad = None
        call(*inputs).backward(g)
        sync()
    out[mode] = time_fn(fn, args)
  return out


def tensors(module) -> dict:
  """Parameters by state-dict name, less diffusers' legacy alias of Downsample2D's conv."""
  return {k: v for k, v in module.state_dict(keep_vars=True).items()
          if not k.startswith("Conv2d_0.")}


def worker_jax(kind, shape, config_name, modes, args):
  """Times the medjax module; checks it against the diffusers module on the same weights."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from medjax.convert.diffusers import state_dict_to_params  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)  # the reference runs once; no idle torch pool beside XLA's
  tmod, tinputs, num_diff, call = torch_module(kind, shape, config_name)
  module = jax_module(kind, shape, args.attention)
  inputs = [jnp.asarray(to_jax_layout(x)) for x in tinputs]
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
  state = {k: v.detach().numpy() for k, v in tensors(tmod).items()}
  params = state_dict_to_params(state, nn.unbox(shapes.get("params", {})), source=kind)
  params = jax.device_put(params)  # one transfer; jnp.asarray compiles per leaf shape
  apply = lambda p, *xs: module.apply({"params": p}, *xs)
  out = {}
  for mode in modes:
    if mode == "forward":
      compiled = jax.jit(apply).lower(params, *inputs).compile()
      fn = lambda compiled=compiled: compiled(params, *inputs).block_until_ready()
      tmod.eval()
      with torch.no_grad():
        ref = [call(*tinputs)]
      got = [compiled(params, *inputs)]
    else:
      g_t = torch.randn(call(*tinputs).shape, generator=torch.Generator().manual_seed(2))
      g = jnp.asarray(to_jax_layout(g_t))
      loss = lambda p, *xs, g=g: jnp.sum(apply(p, *xs) * g)
      grad = jax.grad(loss, argnums=tuple(range(1 + num_diff)))
      compiled = jax.jit(grad).lower(params, *inputs).compile()
      fn = lambda compiled=compiled: jax.block_until_ready(compiled(params, *inputs))
      tmod.train()
      diff = [x.detach().clone().requires_grad_(True) for x in tinputs[:num_diff]]
      call(*diff, *tinputs[num_diff:]).backward(g_t)
      grads = {k: p.grad.numpy() for k, p in tensors(tmod).items()}
      ref_params = state_dict_to_params(grads, nn.unbox(shapes.get("params", {})), source=kind)
      got_grads = compiled(params, *inputs)
      ref = [x.grad for x in diff] + jax.tree.leaves(ref_params)
      got = list(got_grads[1:]) + jax.tree.leaves(got_grads[0])
    ref = [to_jax_layout(r) if isinstance(r, torch.Tensor) else r for r in ref]
    scale = max(float(np.max(np.abs(r))) for r in ref)
    diff_max = max(float(np.max(np.abs(np.asarray(a) - r))) for a, r in zip(got, ref, strict=True))
    out[mode] = dict(time_fn(fn, args), max_diff=diff_max / scale)
  return out


def time_fn(fn, args) -> dict:
  """Median seconds per call: at least --repeats calls and about --min_time seconds."""
  _, once = unet_bench.timed(fn, 1)
  repeats = max(args.repeats, min(1000, int(args.min_time / max(once, 1e-6))))
  if args.clock == "wall":
    _, median = unet_bench.timed(fn, repeats)
  else:
    times = []
    for _ in range(repeats):
      start = time.process_time()
      fn()
      times.append(time.process_time() - start)
    median = statistics.median(times)
  return dict(median_s=median, repeats=repeats)


def dispatch_overhead_s() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((8,))
  f = jax.jit(lambda a: a + 1)
  _, median = unet_bench.timed(lambda: f(x).block_until_ready(), 200)
  return median


def worker(args):
  items = json.loads(args.items)
  runner = worker_jax if args.worker == "jax" else worker_torch
  if args.worker == "jax":
    print("RESULT " + json.dumps(dict(dispatch_s=dispatch_overhead_s())), flush=True)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
  for kind, shape in items:
    result = runner(kind, tuple(shape), args.configs, args.modes.split(","), args)
    print("RESULT " + json.dumps(dict(kind=kind, shape=shape, modes=result)), flush=True)


# -- driver --------------------------------------------------------------------------------------

def spawn(framework: str, config: str, items: list, args) -> list[dict]:
  env = dict(os.environ)
  if framework == "jax" and not args.xla_cpu_default_scheduler:
    # As benchmarks/unet.py (and medjax.train on CPU): the memory-lean XLA:CPU scheduler.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
  cmd = [sys.executable, os.path.abspath(__file__), f"--worker={framework}", f"--configs={config}",
         f"--modes={args.modes}", f"--repeats={args.repeats}", f"--min_time={args.min_time}",
         f"--threads={args.threads}", f"--attention={args.attention}", f"--clock={args.clock}",
         f"--items={json.dumps(items)}"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
             if line.startswith("RESULT ")]
  if out.returncode:
    raise RuntimeError(f"{framework} {config} {items} failed:\n{out.stderr[-3000:]}")
  return results


def main():
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="mid", help="comma-separated: mid, sd15")
  parser.add_argument("--modules", default=DEFAULT_KINDS,
                      help=f"comma-separated kinds of {sorted(KINDS)}, or 'all'")
  parser.add_argument("--sizes", default="", help="only these latent sizes, e.g. 32,16")
  parser.add_argument("--modes", default="forward,grad")
  parser.add_argument("--repeats", type=int, default=5, help="at least this many timed calls")
  parser.add_argument("--min_time", type=float, default=0.3,
                      help="seconds of timed calls per row and framework (more calls if fast)")
  parser.add_argument("--threads", type=int, default=train_bench.num_threads(),
                      help="torch.set_num_threads (default: the CPUs this process may use)")
  parser.add_argument("--attention", default="xla", help="medjax attention implementation")
  parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                      help="cpu: this process's CPU time per call, which on a shared machine "
                      "leaves out the time others ran; only with one core (taskset -c N) and "
                      "--threads=1, else it adds up threads (and their spin-waits)")
  parser.add_argument("--xla_cpu_default_scheduler", action="store_true",
                      help="keep XLA:CPU's concurrency-optimised scheduler (more memory)")
  parser.add_argument("--json", help="also write the rows as JSON to this file ('-': stdout)")
  parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--items", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  kinds = list(KINDS) if args.modules == "all" else args.modules.split(",")
  for kind in kinds:
    if kind not in KINDS:
      parser.error(f"--modules: unknown kind {kind!r}; expected some of {sorted(KINDS)}")
  sizes = {int(s) for s in args.sizes.split(",") if s}
  modes = args.modes.split(",")
  rows = []
  for config in args.configs.split(","):
    if config not in unet_bench.CONFIGS:
      parser.error(f"--configs: unknown config {config!r}")
    instances = unet_instances(config)
    load = os.getloadavg()[0]
    if load > args.threads:
      print(f"note: load average {load:.1f} > {args.threads} threads: the CPUs are shared, and "
            "a multi-threaded pool that waits for a descheduled thread stalls (PyTorch's most)")
    print(f"config {config}, batch 1, fp32, attention={args.attention}, torch threads "
          f"{args.threads}, {args.clock} clock; ratio = medjax / torch; n = runs per U-Net "
          f"forward; gap = n x (medjax - torch) ms; [load avg]", flush=True)
    print(f"{'module':11} {'shape':15} {'n':>3} {'mode':7} {'medjax ms':>9} {'torch ms':>9} "
          f"{'ratio':>6} {'gap ms':>8} {'max|diff|':>9}  load")
    for kind in kinds:
      shapes = sorted([shape for k, shape in instances if k == kind and
                       (not sizes or shape[-1] in sizes)], key=lambda s: (-s[-1], s))
      items = [[kind, list(shape)] for shape in shapes]
      if not items:
        continue
      load = os.getloadavg()[0]
      jax_rows = spawn("jax", config, items, args)
      dispatch = jax_rows.pop(0)["dispatch_s"]
      torch_rows = spawn("torch", config, items, args)
      for j, p in zip(jax_rows, torch_rows, strict=True):
        shape, n = tuple(j["shape"]), instances[(kind, tuple(j["shape"]))]
        for mode in modes:
          jm, pm = j["modes"][mode], p["modes"][mode]
          row = dict(config=config, module=kind, shape=list(shape), count=n, mode=mode,
                     part_of=KINDS[kind], medjax_ms=jm["median_s"] * 1e3,
                     torch_ms=pm["median_s"] * 1e3, max_diff=jm["max_diff"], load=load,
                     dispatch_ms=dispatch * 1e3)
          row["ratio"] = row["medjax_ms"] / row["torch_ms"]
          rows.append(row)
          note = f" (in {KINDS[kind]})" if KINDS[kind] else ""
          print(f"{kind:11} {shape_str(kind, shape):15} {n:3d} {mode:7} {row['medjax_ms']:9.3f} "
                f"{row['torch_ms']:9.3f} {row['ratio']:6.2f} "
                f"{n * (row['medjax_ms'] - row['torch_ms']):8.2f} {row['max_diff']:9.1e}  "
                f"[{load:.1f}]{note}", flush=True)
    print(f"(one empty jitted call: {dispatch * 1e3:.3f} ms)")
    summary(rows, config, modes)
  if args.json:
    text = json.dumps(rows, indent=1)
    if args.json == "-":
      print(text)
    else:
      with open(args.json, "w") as f:
        f.write(text + "\n")


def summary(rows: list[dict], config: str, modes: list[str]) -> None:
  """Per kind and mode: n-weighted ms on both sides; top-level kinds add up to a U-Net estimate."""
  print(f"\n{config}: n-weighted totals (ms per U-Net call)")
  print(f"{'module':11} {'mode':7} {'medjax':>9} {'torch':>9} {'ratio':>6} {'gap':>8}")
  for mode in modes:
    total = [0.0, 0.0]
    by_kind = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
      if r["config"] == config and r["mode"] == mode:
        by_kind[r["module"]][0] += r["count"] * r["medjax_ms"]
        by_kind[r["module"]][1] += r["count"] * r["torch_ms"]
    for kind, (j, p) in by_kind.items():
      if KINDS[kind] is None:
        total[0] += j
        total[1] += p
      note = f" (in {KINDS[kind]})" if KINDS[kind] else ""
      print(f"{kind:11} {mode:7} {j:9.2f} {p:9.2f} {j / p:6.2f} {j - p:8.2f}{note}")
    if total[1]:
      print(f"{'top-level':11} {mode:7} {total[0]:9.2f} {total[1]:9.2f} "
            f"{total[0] / total[1]:6.2f} {total[0] - total[1]:8.2f}")


if __name__ == "__main__":
  main()
