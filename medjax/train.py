"""python -m medjax.train --config=configs/cxr_unet.py[:arg] --workdir=DIR [--config.key=value]

config -> mesh -> model (+ placeholder tokens) -> sharded train state (restored if the workdir
has checkpoints) -> loop of one jitted, donated step -> checkpoints, metrics, sample grids,
learned embeddings. Re-running the same command resumes exactly where the last checkpoint was.
"""
import dataclasses
import json
import logging as pylogging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from medjax import atomic
from medjax import checkpoint as checkpoint_lib
from medjax import metrics_writer
from medjax import objectives
from medjax import sharding
from medjax import train_config
from medjax.convert import embeddings as embeddings_lib
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


# -- building blocks (importable; tests call them) -------------------------------------------------

def parse_tokens(pairs) -> list[tuple[str, str]]:
  """(('<a>', 'words a'), ('<b>', 'words b')) checked -> [('<a>', 'words a'), ...]."""
  out = []
  for pair in pairs if not isinstance(pairs, str) else [pairs]:
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
        or not all(isinstance(x, str) and x.strip() for x in pair)):
      raise MedjaxError(f"config.textual_inversion.tokens: {pair!r} is not a "
                        "('<token>', 'init words') pair")
    if pair[0].strip() in [t for t, _ in out]:
      raise MedjaxError(f"config.textual_inversion.tokens: {pair[0].strip()!r} is given twice")
    out.append((pair[0].strip(), pair[1].strip()))
  if not out:
    raise MedjaxError("config.textual_inversion.tokens is empty: give ('<token>', 'init words') "
                      "pairs")
  return out


def initial_vectors(sd: StableDiffusion, words: str, num_vectors: int) -> np.ndarray:
  """[num_vectors, dim] rows copied from the embeddings of `words`' tokens (cycled)."""
  tok = embeddings_lib._base_tokenizer(sd.tokenizer)  # pylint: disable=protected-access
  ids = tok(words, add_special_tokens=False)["input_ids"]
  if not ids:
    raise MedjaxError(f"textual inversion: initializer {words!r} has no tokens")
  table = np.asarray(embeddings_lib.token_embedding_table(sd.params["text_encoder"]))
  return np.stack([table[ids[i % len(ids)]] for i in range(num_vectors)])


def build_model(config: Any) -> tuple[StableDiffusion, objectives.Trainable]:
  """The pipeline (with placeholder tokens for textual inversion) and what it trains."""
  dtype = DTYPES.get(config.mixed_precision)
  if dtype is None:
    raise MedjaxError(f"config.mixed_precision={config.mixed_precision!r}: expected fp32 or bf16")
  kw = {"dtype": dtype, "remat": config.remat}
  if config.model.pretrained:
    sd = StableDiffusion.from_pretrained(config.model.pretrained,
                                         variant=config.model.variant or None, **kw)
  else:
    sd = StableDiffusion.embedded(seed=config.model.embedded_seed, **kw)
  if config.objective == "textual_inversion":
    tokens = parse_tokens(config.textual_inversion.tokens)
    n = int(config.textual_inversion.num_vectors)
    if n < 1:
      raise MedjaxError(f"config.textual_inversion.num_vectors={n}: expected >= 1")
    sd = embeddings_lib.add_tokens(sd, {t: initial_vectors(sd, w, n) for t, w in tokens})
    base = embeddings_lib._base_tokenizer(sd.tokenizer)  # pylint: disable=protected-access
    names = [name for t, _ in tokens for name in [t] + [f"{t}_{i}" for i in range(1, n)]]
    ids = tuple(int(base.convert_tokens_to_ids(name)) for name in names)
    return sd, objectives.Trainable("textual_inversion", token_ids=ids)
  return sd, objectives.Trainable(config.objective,
                                  train_text_encoder=config.unet.train_text_encoder)


def loss_config(config: Any, sd: StableDiffusion) -> objectives.LossConfig:
  return objectives.LossConfig(
      prediction_type=sd.scheduler_config.get("prediction_type", "epsilon"),
      min_snr_gamma=float(config.min_snr_gamma), prior_loss_weight=float(config.prior.weight),
      scaling_factor=sd.scaling_factor, noise_offset=float(config.noise_offset))


def trainable_logical_axes(sd: StableDiffusion, trainable: objectives.Trainable) -> dict:
  axes = sd.logical_axes()
  if trainable.kind == "textual_inversion":
    return {"embeddings": P(None, "embed")}
  return {k: axes[k] for k in (("unet", "text_encoder") if trainable.train_text_encoder
                               else ("unet",))}


@dataclasses.dataclass
class Setup:
  """A run's pieces, built once; `step` is the jitted train step.

  `sd.params` holds only the frozen params (`frozen`): the trained ones live in the state (their
  initial buffers were donated to it, so a fine-tuned U-Net is never held twice). Use
  `trained_pipeline(run, state)` for a complete model.
  """
  sd: StableDiffusion
  trainable: objectives.Trainable
  mesh: Any
  frozen: dict
  state: objectives.TrainState
  state_shardings: Any
  step: Any
  encode: Any
  schedule: Any


def setup(config: Any, mesh=None) -> Setup:
  """Builds model, mesh, sharded state and the jitted step (no data, no checkpoint I/O)."""
  mesh = mesh or sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  if config.grad_accum < 1 or config.batch_size % config.grad_accum or (
      (config.batch_size // config.grad_accum) % sharding.data_parallel_size(mesh)):
    raise MedjaxError(f"config.grad_accum={config.grad_accum}: batch_size={config.batch_size} "
                      "must split into grad_accum micro-batches that each divide over the "
                      f"{sharding.data_parallel_size(mesh)} data-parallel devices")
  rules = sharding.rules_tuple(config.mesh.rules)
  sd, trainable = build_model(config)
  train_params, frozen = trainable.split(sd.params)
  all_axes = sd.logical_axes()
  frozen_axes = {k: all_axes[k] for k in frozen}
  frozen_sh = sharding.param_shardings(frozen_axes, frozen, mesh, rules)
  frozen = jax.device_put(frozen, frozen_sh)
  param_sh = sharding.param_shardings(trainable_logical_axes(sd, trainable), train_params, mesh,
                                      rules)
  train_params = jax.device_put(train_params, param_sh)
  optimizer = objectives.make_optimizer(config, trainable, train_params)
  schedule = objectives.learning_rate_schedule(config)
  rep = sharding.replicated(mesh)
  opt_sh = optax_state_shardings(optimizer, train_params, param_sh, rep)
  state_sh = objectives.TrainState(step=rep, params=param_sh, opt_state=opt_sh,
                                   ema_params=param_sh if config.ema_decay > 0 else None, rng=rep)
  sd = dataclasses.replace(sd, params=frozen)
  state = jax.jit(lambda p: objectives.init_state(p, optimizer, config.seed, config.ema_decay > 0),
                  out_shardings=state_sh, donate_argnums=(0,))(train_params)
  del train_params
  step_fn = objectives.make_train_step(
      sd, trainable, optimizer, loss_config(config, sd), grad_accum=config.grad_accum,
      ema_decay=float(config.ema_decay), schedule=schedule)
  step = jax.jit(with_encoder(step_fn, sd), in_shardings=(state_sh, frozen_sh, None),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
  batch_sh = sharding.batch_sharding(mesh)
  encode = jax.jit(lambda vae_p, x: vae_moments(sd, vae_p, x), out_shardings=batch_sh)
  return Setup(sd, trainable, mesh, frozen, state, state_sh, step, encode, schedule)


def optax_state_shardings(optimizer, params, param_sh, replicated):
  """Optimizer-state shardings: moments like their params, counters replicated."""
  import optax  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_sh,
                               transform_non_params=lambda _: replicated)


def vae_moments(sd: StableDiffusion, vae_params, images) -> jax.Array:
  """Images [-1, 1] NHWC -> the VAE posterior's (mean, logvar) concatenated on channels."""
  mean, logvar = sd.vae.apply({"params": vae_params}, images, method="encode")
  return jnp.concatenate([mean, logvar], axis=-1).astype(jnp.float32)


def with_encoder(step_fn, sd: StableDiffusion):
  """Lets a batch carry images instead of moments: the frozen VAE runs in the step, outside the
  gradient."""
  def step(state, frozen, batch):
    if "image" in batch:
      batch = dict(batch)
      batch["moments"] = jax.lax.stop_gradient(vae_moments(sd, frozen["vae"], batch.pop("image")))
    return step_fn(state, frozen, batch)
  return step


# -- data ------------------------------------------------------------------------------------------

def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order."""
  shards = {}
  for s in array.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, np.asarray(s.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def encode_rows(run: Setup, images: np.ndarray) -> np.ndarray:
  """This process's images [-1, 1] -> their VAE moments, encoded sharded over the mesh."""
  return local_rows(run.encode(run.frozen["vae"],
                               sharding.shard_batch({"x": images}, run.mesh)["x"]))


class LatentCache:
  """VAE moments per record key, so each image is encoded once (deterministic pipelines only)."""

  def __init__(self):
    self.table: dict[str, np.ndarray] = {}

  def moments(self, run: Setup, keys, images: np.ndarray) -> np.ndarray:
    missing = [i for i, k in enumerate(keys) if k not in self.table]
    if missing:
      out = encode_rows(run, images)
      for i in missing:
        self.table[keys[i]] = out[i]
    return np.stack([self.table[k] for k in keys])


@dataclasses.dataclass
class PriorImages:
  """Class images for prior preservation: their moments and prompt ids, cycled by step."""
  moments: np.ndarray
  input_ids: np.ndarray

  def rows(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = (step * n + np.arange(n)) % len(self.moments)
    return self.moments[idx], self.input_ids[idx]


def host_batch(run: Setup, batch: dict, *, step: int, cache: LatentCache | None,
               prior: PriorImages | None) -> dict:
  """A data batch (this process's rows) -> the arrays the jitted step takes, sharded."""
  ids = run.sd.tokenize(list(batch["prompt"]))
  out = {"input_ids": ids}
  if cache is None and prior is None:
    out["image"] = batch["image"]
  else:
    moments = (cache.moments(run, list(batch["key"]), batch["image"]) if cache is not None
               else encode_rows(run, batch["image"]))
    out["moments"] = moments
    if prior is not None:
      n = len(moments)
      pm, pids = prior.rows(step, n)
      out = {"moments": np.concatenate([moments, pm]), "input_ids": np.concatenate([ids, pids]),
             "prior": np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])}
  return sharding.shard_batch(out, run.mesh)


def rgb_in_unit_range(image: np.ndarray) -> np.ndarray:
  """(H, W) or (H, W, 1|3) in [0, 1] -> (H, W, 3) float32."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def make_prior_images(config: Any, run: Setup, state: objectives.TrainState,
                      workdir: Path) -> PriorImages:
  """Reads the given class images, or generates them with the model as it starts (once, into
  the workdir: a resumed run finds them there), and encodes them."""
  from medjax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  from medjax.data import loader as data_loader  # pylint: disable=g-import-not-at-top
  from medjax.data import read_image  # pylint: disable=g-import-not-at-top
  p = config.prior
  folder = Path(p.class_images_dir) if p.class_images_dir else workdir / "class_images"
  files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
  if not p.class_images_dir and len(files) < p.num_class_images and jax.process_index() == 0:
    logging.info("prior preservation: generating %d class images of %r", p.num_class_images,
                 p.class_prompt)
    tmp = workdir / ".class_images.tmp"
    sample_lib.sample_to_dir(trained_pipeline(run, state, ema=False), tmp,
                             prompt=p.class_prompt, num_images=p.num_class_images,
                             batch_size=min(p.num_class_images, 8),
                             steps=p.num_inference_steps, guidance=p.guidance_scale,
                             height=config.resolution, width=config.resolution, seed=config.seed)
    (tmp / "grid.png").unlink()
    if folder.exists():  # too few images (some deleted): the new set replaces them whole
      shutil.rmtree(folder)
    os.replace(tmp, folder)
    files = sorted(folder.glob("*.png"))
  if not files:
    raise MedjaxError(f"config.prior.class_images_dir={str(folder)!r}: no PNG/JPEG images")
  images = np.stack([data_loader.resize_to(rgb_in_unit_range(read_image(f)), config.resolution)
                     for f in files]) * 2 - 1
  moments = []
  n = sharding.data_parallel_size(run.mesh)
  for i in range(0, len(images), n):
    chunk = images[i:i + n]
    pad = n - len(chunk)
    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
    moments.append(np.asarray(run.encode(run.frozen["vae"], chunk))[:n - pad])
  ids = run.sd.tokenize([p.class_prompt] * len(files))
  return PriorImages(np.concatenate(moments), ids)


# -- outputs ---------------------------------------------------------------------------------------

def trained_pipeline(run: Setup, state: objectives.TrainState, *, ema: bool = True
                     ) -> StableDiffusion:
  """The pipeline with the trained params merged in (EMA params when kept and asked)."""
  params = state.ema_params if ema and state.ema_params is not None else state.params
  return dataclasses.replace(run.sd, params=run.trainable.merge(params, run.frozen))


def sample_prompts(config: Any) -> list[str]:
  if config.sample.prompts:
    return list(config.sample.prompts)
  prompts = config.data.prompt
  if prompts.kind == "class" or config.objective == "textual_inversion":
    texts = list(dict(prompts.class_prompts).values())
    if prompts.kind == "token":
      texts = [prompts.token_template.format(token=prompts.token, modality="", class_text="",
                                             class_name="", labels="", text="")]
    return texts
  return ["a chest x-ray with pleural effusion", "a chest x-ray with no finding"]


def write_sample_grid(config: Any, sd: StableDiffusion, workdir: Path, step: int,
                      writer) -> Path | None:
  """A grid of `sample.num_per_prompt` images per sample prompt (none when that is 0)."""
  from medjax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  s = config.sample
  if s.num_per_prompt <= 0:
    return None
  prompts = [p for p in sample_prompts(config) for _ in range(s.num_per_prompt)]
  images = sd.generate(prompts, num_inference_steps=s.num_inference_steps,
                       guidance_scale=s.guidance_scale, scheduler=s.scheduler,
                       height=config.resolution, width=config.resolution,
                       seed=[s.seed + i for i in range(len(prompts))])
  grid = sample_lib.grid(sample_lib.to_uint8(images))
  out = workdir / "samples" / f"step_{step:06d}.png"
  out.parent.mkdir(parents=True, exist_ok=True)
  sample_lib.save_png(grid, out, {"synthetic": "true", "generator": "medjax.train",
                                  "prompts": " | ".join(sample_prompts(config)),
                                  "step": step, "model": sd.name})
  writer.write_images(step, {"samples": grid[None]})
  return out


def write_embeddings(run: Setup, state: objectives.TrainState, config: Any, workdir: Path,
                     step: int) -> list[Path]:
  """Each learned token as diffusers `learned_embeds` (embeddings/diffusers/<token>.safetensors,
  for `load_textual_inversion`) and AUTOMATIC1111 (embeddings/a1111/<token>.safetensors)."""
  params = state.ema_params if state.ema_params is not None else state.params
  rows = np.asarray(jax.device_get(params["embeddings"]), np.float32)
  n = int(config.textual_inversion.num_vectors)
  paths = []
  for i, (token, _) in enumerate(parse_tokens(config.textual_inversion.tokens)):
    emb = rows[i * n:(i + 1) * n]
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in token).strip("_") or "token"
    for kind in ("diffusers", "a1111"):
      (workdir / "embeddings" / kind).mkdir(parents=True, exist_ok=True)
    paths.append(embeddings_lib.write_diffusers_embeddings(
        workdir / "embeddings" / "diffusers" / f"{name}.safetensors", {token: emb}))
    paths.append(embeddings_lib.write_a1111_embeddings(
        workdir / "embeddings" / "a1111" / f"{name}.safetensors", token, emb, step=step))
  return paths


def release_compiler_memory() -> None:
  """Hands the compiler's freed heap back to the OS (glibc keeps it otherwise: ~0.9 GB of RSS
  after compiling a mid-size U-Net step on CPU, benchmarks/train_step.py --malloc_trim)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


# -- the run ---------------------------------------------------------------------------------------

def check_prompt_lengths(sd: StableDiffusion, prompts) -> None:
  """Prompts longer than the text encoder's context lose their tail, which for textual
  inversion would silently drop learned vectors: refuse them."""
  limit = int(getattr(sd.tokenizer, "model_max_length", 77))
  for prompt in prompts:
    n = len(sd.tokenizer(prompt)["input_ids"])
    if n > limit:
      raise MedjaxError(f"prompt {prompt!r} is {n} tokens after expanding placeholder tokens; "
                        f"the text encoder takes {limit}. Use fewer vectors per token "
                        "(config.textual_inversion.num_vectors) or a shorter prompt")


def check_workdir(config: Any, workdir: Path) -> None:
  """Refuses a workdir whose checkpoints came from another config (unless allowed)."""
  old = checkpoint_lib.read_run_config(workdir)
  has_ckpt = (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir())
  if old is None or not has_ckpt:
    return
  new = json.loads(config.to_json())
  changed = [k for k in train_config.config_diff(old, new)
             if k.split(".")[0] not in train_config.RESUMABLE_KEYS]
  if changed and not config.allow_config_change:
    raise MedjaxError(f"{workdir} holds checkpoints of another config (differs in "
                      f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); use another "
                      "--workdir or set --config.allow_config_change=True to resume anyway")


def write_config(config: Any, workdir: Path) -> None:
  atomic.write_text(workdir / "config.json", config.to_json(indent=1) + "\n")


def check_run_config(config: Any) -> None:
  train_config.check_train_config(config)
  if config.cache_latents and (config.data.pipeline.flip or config.data.pipeline.crop != "center"):
    raise MedjaxError("config.cache_latents needs a deterministic pipeline: set "
                      "data.pipeline.flip=False and data.pipeline.crop='center'")
  if config.total_steps < 1:
    raise MedjaxError(f"config.total_steps={config.total_steps}: expected a positive integer")


def train(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs (or resumes) a training run; returns a summary dict (also written to the workdir)."""
  import tqdm  # pylint: disable=g-import-not-at-top

  from medjax.data import make_dataset  # pylint: disable=g-import-not-at-top
  check_run_config(config)
  sharding.maybe_initialize_distributed()
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  check_workdir(config, workdir)
  run = setup(config)
  if run.trainable.kind == "textual_inversion":
    check_prompt_lengths(run.sd, list(dict(config.data.prompt.class_prompts).values())
                         + sample_prompts(config))
  lead = jax.process_index() == 0
  if lead:
    write_config(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                     every=config.checkpoint_every_steps)
  per_process = config.batch_size // jax.process_count()
  data = make_dataset(config.data, "train", per_process, seed=config.seed,
                      resolution=config.resolution)
  state, start = run.state, 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            run.state, run.state_shardings)
    state, extra, start = ckpt.restore(abstract)
    data.set_state(extra["data"])
    logging.info("resumed from step %d", start)
  cache = LatentCache() if config.cache_latents else None
  prior = make_prior_images(config, run, state, workdir) if config.prior.enabled else None
  writer = metrics_writer.create_writer(workdir / "tensorboard", just_logging=not lead)
  if start == 0:
    writer.write_hparams({k: v for k, v in json.loads(config.to_json()).items()
                          if not isinstance(v, dict)})
  ckpt.watch_preemption()
  save = lambda s, st, force=False: ckpt.save(s, st, {"data": data.get_state()}, force=force)

  images_per_step = config.batch_size * (2 if prior else 1)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                  disable=not (lead and config.progress_bar), dynamic_ncols=True)
  step, last_loss, t0, steps_done, stopped = start, float("nan"), time.perf_counter(), 0, ""
  window = []
  while step < config.total_steps:
    batch = host_batch(run, next(data), step=step, cache=cache, prior=prior)
    state, metrics = run.step(state, run.frozen, batch)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      ckpt.wait()
      raise MedjaxError(f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. "
                        f"Last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}. "
                        "Lower config.learning_rate or use fp32.")
    step += 1
    steps_done += 1
    if steps_done == 1:
      release_compiler_memory()
    last_loss = loss
    window.append(time.perf_counter())
    window = window[-20:]
    rate = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate * images_per_step:.1f}")
    bar.update(1)
    if step % config.log_every_steps == 0 or step == config.total_steps:
      writer.write_scalars(step, {**{k: float(v) for k, v in metrics.items()},
                                  "steps_per_s": rate, "images_per_s": rate * images_per_step})
    save(step, state)
    if config.sample_every_steps and step % config.sample_every_steps == 0 and lead:
      write_sample_grid(config, trained_pipeline(run, state), workdir, step, writer)
    if ckpt.preempted(step):
      stopped = "preempted (SIGTERM)"
      break
    if config.stop_after_steps and steps_done >= config.stop_after_steps:
      stopped = f"stop_after_steps={config.stop_after_steps}"
      break
  bar.close()
  save(step, state, force=True)
  ckpt.wait()
  outputs = {}
  if not stopped and lead:
    grid = write_sample_grid(config, trained_pipeline(run, state), workdir, step, writer)
    if grid is not None:
      outputs["samples"] = str(grid)
    if run.trainable.kind == "textual_inversion":
      outputs["embeddings"] = [str(p) for p in write_embeddings(run, state, config, workdir,
                                                                step)]
  writer.flush()
  writer.close()
  ckpt.close()
  summary = {"step": step, "loss": last_loss, "stopped": stopped or None,
             "seconds": time.perf_counter() - t0, "checkpoints": ckpt.all_steps(), **outputs}
  if lead:
    atomic.write_text(workdir / "summary.json", json.dumps(summary, indent=1) + "\n")
  return summary


def restore_pipeline(workdir, *, step: int | None = None, ema: bool = True) -> StableDiffusion:
  """A workdir's trained pipeline (base model + checkpointed params), e.g. for export."""
  workdir = Path(workdir)
  raw = checkpoint_lib.read_run_config(workdir)
  if raw is None:
    raise MedjaxError(f"{workdir}: no config.json; not a medjax training workdir")
  config = train_config.base_config()
  config.update_from_flattened_dict(_flatten(raw))
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  config.mesh.data, config.mesh.fsdp = 1, 1
  config.batch_size, config.grad_accum = 1, 1
  run = setup(config, mesh=mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=10 ** 6)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          run.state, run.state_shardings)
  state, _, _ = ckpt.restore(abstract, step)
  ckpt.close()
  return trained_pipeline(run, state, ema=ema)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and f"{prefix}{k}" not in train_config.FREE_MAPS:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(tuple(x) if isinstance(x, list) else x for x in v) \
          if isinstance(v, list) else v
  return out


# -- command line ----------------------------------------------------------------------------------

def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A config file: configs/<name>.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and outputs go.")
  flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops orbax's per-save INFO chatter (a dozen lines per checkpoint); warnings still show."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  for handler in pylogging.getLogger().handlers + pylogging.getLogger("absl").handlers:
    handler.addFilter(_QuietLibraries())
  _cpu_defaults()
  summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
  print(json.dumps(summary, indent=1))


def _cpu_defaults():
  """XLA:CPU's concurrency-optimised scheduler doubles the train step's buffers (benchmarks/
  unet.py); on CPU-only machines prefer the memory-lean one unless the user set XLA_FLAGS."""
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()


def run():
  from medjax import cli  # pylint: disable=g-import-not-at-top
  cli.run_with_config(main, define_flags)


if __name__ == "__main__":
  run()
