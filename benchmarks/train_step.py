"""Training step: medjax `trainer.setup(...).step` vs diffusers' PyTorch training scripts, same run.

  python benchmarks/train_step.py                        # tiny and mid: TI (8, 64 vectors), fine-tune
  python benchmarks/train_step.py --configs=mid --kinds=ft --repeats=5 --batch=2
  python benchmarks/train_step.py --configs=sd15         # SD1.5-sized random pipeline (heavy)
  python benchmarks/train_step.py --bf16                 # bf16 compute (GPU; slow on CPU)
  python benchmarks/train_step.py --remat                # medjax remat (PyTorch as is)
  python benchmarks/train_step.py --configs=mid --kinds=ti8 --loop   # + whole medjax.train loop

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
"""
import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

RESOLUTION = {"tiny": 64, "mid": 256, "sd15": 512}
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


# -- the pipelines -------------------------------------------------------------------------------

def write_pipeline(config: str, out_dir: str) -> None:
  """The random diffusers directory both sides read (the embedded tiny model, or mid/sd15)."""
  if config == "tiny":
    from medjax import StableDiffusion  # pylint: disable=g-import-not-at-top
    StableDiffusion.embedded(0).save_pretrained(out_dir)
    return
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top

  from tests import tiny_diffusers  # pylint: disable=g-import-not-at-top
  pipe = tiny_diffusers.make_pipeline_dir(out_dir, style="sd1")
  shutil.rmtree(out_dir)
  torch.manual_seed(0)
  sd15 = config == "sd15"
  text = tiny_diffusers.configs("sd1")["text_encoder"]
  text.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12 if sd15 else 4, projection_dim=768)
  pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
  unet_cfg = unet_bench.unet_config(config)
  unet_cfg.update(sample_size=RESOLUTION[config] // 8)
  pipe.unet = UNet2DConditionModel(**unet_cfg).eval()
  if sd15:
    pipe.vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4).eval()
  pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae)
  pipe.save_pretrained(out_dir)


def images(batch: int, resolution: int):
  """The same images in [-1, 1] for both sides, NHWC."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)).astype(
      np.float32)


def malloc_trim() -> None:
  """Returns freed glibc heap (e.g. XLA's compiler arenas) to the OS, so RSS drops to what is
  in use."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def run_steps(step, warmup: int, repeats: int, trim: bool = False) -> dict:
  """Warm-up steps (untimed), then the peak-RSS reset, then `repeats` timed steps."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  if trim:
    malloc_trim()
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
  stats = device.memory_stats() if device.platform == "gpu" else None
  out["peak_bytes"] = stats["peak_bytes_in_use"] if stats else unet_bench.peak_host_bytes()
  plan = compiled.memory_analysis()
  if plan is not None:
    out["plan"] = {k: int(getattr(plan, f"{k}_size_in_bytes")) for k in
                   ("argument", "output", "temp", "alias", "generated_code")}
    out["plan_bytes"] = (plan.argument_size_in_bytes + plan.output_size_in_bytes
                         + plan.temp_size_in_bytes - plan.alias_size_in_bytes)
  size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  out.update(setup_s=setup_s, compile_s=compile_s, loss=holder["loss"], device=device.platform,
             state_bytes=size(holder["state"]), frozen_bytes=size(run.frozen))
  return out


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


# -- PyTorch (diffusers' example training scripts) -----------------------------------------------

def run_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel, CLIPTokenizer  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  kind, n = parse_kind(args.kinds)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  weight_dtype = torch.bfloat16 if args.bf16 else torch.float32
  path = args.path
  t0 = time.perf_counter()
  tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
  noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
  text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
  vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
  unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
  vae.requires_grad_(False)

  if kind == "ti":
    # examples/textual_inversion/textual_inversion.py
    placeholder_tokens = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)]
    if tokenizer.add_tokens(placeholder_tokens) != n:
      raise RuntimeError(f"tokenizer already has {TOKEN}")
    initializer_token_id = tokenizer.encode(INIT_WORD, add_special_tokens=False)[0]
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
      for token_id in placeholder_token_ids:
        token_embeds[token_id] = token_embeds[initializer_token_id].clone()
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5: flattened
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if args.bf16:  # the script casts the frozen U-Net and VAE; the text encoder stays fp32
      unet.to(weight_dtype)
      vae.to(weight_dtype)
    text_encoder.to(device).train()
    unet.to(device)
    vae.to(device)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=LR,
                                  betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    prompt = TI_PROMPT.format(" ".join(placeholder_tokens))
    lo, hi = min(placeholder_token_ids), max(placeholder_token_ids)
  else:
    # examples/text_to_image/train_text_to_image.py
    text_encoder.requires_grad_(False)
    if args.bf16:  # the script casts the frozen text encoder and VAE; the U-Net stays fp32
      text_encoder.to(weight_dtype)
      vae.to(weight_dtype)
    text_encoder.to(device)
    vae.to(device)
    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY, eps=EPS)
    prompt = FT_PROMPT
  setup_s = time.perf_counter() - t0
  input_ids = tokenizer([prompt] * args.batch, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt"
                        ).input_ids.to(device)
  pixel_values = torch.from_numpy(images(args.batch, RESOLUTION[args.configs])).permute(
      0, 3, 1, 2).contiguous().to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
  holder = {}

  def noisy_latents():
    with torch.no_grad():
      latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample()
      latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), device=device).long()
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps

  def ti_step():
    noisy, noise, timesteps = noisy_latents()
    with autocast():
      encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
      model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
    index_no_updates[lo:hi + 1] = False
    with torch.no_grad():
      text_encoder.get_input_embeddings().weight[index_no_updates] = (
          orig_embeds_params[index_no_updates])
    holder["loss"] = loss.item()
    sync()

  def ft_step():
    noisy, noise, timesteps = noisy_latents()
    with torch.no_grad():
      encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
    with autocast():
      model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    holder["loss"] = loss.item()
    sync()

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  out = run_steps(ti_step if kind == "ti" else ft_step, args.warmup, args.repeats,
                  args.malloc_trim)
  out["peak_bytes"] = (torch.cuda.max_memory_allocated() if device == "cuda"
                       else unet_bench.peak_host_bytes())
  out.update(setup_s=setup_s, loss=holder["loss"], device=device,
             threads=torch.get_num_threads())
  return out


# -- driver --------------------------------------------------------------------------------------

def spawn(framework: str, config: str, kind: str, path: str, args, extra=(), env=None) -> dict:
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
  cmd += list(extra)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"{framework} {config} {kind} failed:\n{out.stderr[-3000:]}")


def loop_time(config: str, kind: str, path: str, args) -> tuple[float, list[dict]]:
  """Marginal seconds per step of `trainer.train`: runs of N and N + repeats steps."""
  base = args.warmup + 1
  with tempfile.TemporaryDirectory() as cache:
    env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    runs = [spawn("jaxloop", config, kind, path, args, [f"--loop_steps={n}"], env)
            for n in (base, base, base + args.repeats)]  # the first fills the cache
  runs = runs[1:]
  return (runs[1]["seconds"] - runs[0]["seconds"]) / args.repeats, runs


def verdict(ratio: float, target: float) -> str:
  return f"{'ok' if ratio <= target else 'MISS'}<={target:g}"


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
  parser.add_argument("--loop_steps", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--worker", choices=["jax", "jaxloop", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.warmup < 1:
    parser.error("--warmup must be >= 1")
  if args.worker:
    result = {"jax": run_jax, "jaxloop": run_jax_loop, "torch": run_torch}[args.worker](args)
    print("RESULT " + json.dumps(result))
    return
  for config in args.configs.split(","):
    if config not in RESOLUTION:
      parser.error(f"--configs: unknown config {config!r}")
  kinds = args.kinds.split(",")
  for kind in kinds:
    parse_kind(kind)

  print(f"batch {args.batch}, {'bf16' if args.bf16 else 'fp32'}"
        f"{', medjax remat' if args.remat else ''}"
        f"{', malloc_trim before RSS reset' if args.malloc_trim else ''}, median of {args.repeats} steps after "
        f"{args.warmup} warm-up, {args.threads} threads, load avg before each pair in []")
  header = (f"{'config':6} {'step':5} {'medjax s':>9} {'torch s':>9} {'time x':>7} "
            f"{'target':>9} {'medjax MB':>10} {'torch MB':>9} {'mem x':>6} {'target':>9} "
            f"{'xla plan MB':>11} {'compile s':>9}  load")
  print(header, flush=True)
  details, loops = [], []
  for config in args.configs.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "pipe")
      write_pipeline(config, path)
      for kind in kinds:
        load = os.getloadavg()[0]
        j = spawn("jax", config, kind, path, args)
        p = spawn("torch", config, kind, path, args)
        tx = j["median_s"] / p["median_s"]
        mx = j["peak_bytes"] / p["peak_bytes"]
        print(f"{config:6} {kind:5} {j['median_s']:9.3f} {p['median_s']:9.3f} {tx:7.2f} "
              f"{verdict(tx, TIME_TARGET[parse_kind(kind)[0]]):>9} "
              f"{j['peak_bytes'] / 2**20:10.0f} {p['peak_bytes'] / 2**20:9.0f} {mx:6.2f} "
              f"{verdict(mx, MEM_TARGET):>9} {j.get('plan_bytes', 0) / 2**20:11.0f} "
              f"{j['compile_s']:9.1f}  [{load:.1f}] {j['device']}", flush=True)
        details.append((config, kind, j, p))
        if args.loop:
          loops.append((config, kind, j, loop_time(config, kind, path, args)))
  if loops:
    print(f"\nmedjax's whole train loop vs its bare jitted step (s/step; loop: marginal time of "
          f"{args.repeats} more steps):")
    for config, kind, j, (per_step, runs) in loops:
      ratio = per_step / j["median_s"]
      print(f"{config:6} {kind:5} step {j['median_s']:.3f} loop {per_step:.3f} x{ratio:.3f} "
            f"{verdict(ratio, LOOP_TARGET)}  (runs: "
            + ", ".join(f"{r['steps']} steps {r['seconds']:.1f} s" for r in runs) + ")")
  print("\nmedjax XLA buffer plan (MB: arguments / outputs / temporaries / donated aliases), "
        "state and frozen params, losses, per-step times:")
  for config, kind, j, p in details:
    mb = {k: v / 2**20 for k, v in j.get("plan", {}).items()}
    print(f"{config:6} {kind:5} args {mb.get('argument', 0):.1f} out {mb.get('output', 0):.1f} "
          f"temp {mb.get('temp', 0):.1f} alias {mb.get('alias', 0):.1f} | state {j['state_bytes'] / 2**20:.1f} "
          f"frozen {j['frozen_bytes'] / 2**20:.1f} | loss medjax {j['loss']:.4f} torch "
          f"{p['loss']:.4f} | medjax {[f'{t:.3f}' for t in j['times']]} torch "
          f"{[f'{t:.3f}' for t in p['times']]}")


if __name__ == "__main__":
  main()
