"""Training as a library: config -> mesh -> model (+ placeholder tokens) -> sharded train state
(restored if the workdir has checkpoints) -> loop of one jitted, donated step -> checkpoints,
metrics, sample grids, learned embeddings. `python -m medjax.train` is its command line.

Multi-process: every process runs this same code on its share of the data; everything that
touches sharded arrays (steps, sample grids, class images, saves) runs on all of them, and
only process 0 writes files (`medjax.hosts`). The loop never waits for the devices between
log, checkpoint and sample steps (`jax.transfer_guard_device_to_host('disallow')` holds there).
"""
import collections
import contextlib
import ctypes
import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.sharding import PartitionSpec as P

from medjax import atomic
from medjax import batches
from medjax import checkpoint as checkpoint_lib
from medjax import distributed
from medjax import hosts
from medjax import metrics_writer
from medjax import objectives
from medjax import paths
from medjax import run_outputs
from medjax import sharding
from medjax import tokenizer as tokenizer_lib
from medjax import train_config
from medjax import workdir as workdir_lib
from medjax.data import make_dataset
from medjax.data import split_file
from medjax.errors import MedjaxError
from medjax.eval import provenance
from medjax.models import clip
from medjax.pipeline import StableDiffusion

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


# -- building blocks -------------------------------------------------------------------------------

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
  tok = tokenizer_lib.base_tokenizer(sd.tokenizer)
  ids = tok(words, add_special_tokens=False)["input_ids"]
  if not ids:
    raise MedjaxError(f"textual inversion: initializer {words!r} has no tokens")
  table = np.asarray(clip.token_embedding_table(sd.params["text_encoder"]))
  return np.stack([table[ids[i % len(ids)]] for i in range(num_vectors)])


def build_model(config: Any) -> tuple[StableDiffusion, objectives.Trainable]:
  """The pipeline (with placeholder tokens for textual inversion) and what it trains."""
  dtype = DTYPES.get(config.mixed_precision)
  if dtype is None:
    raise MedjaxError(f"config.mixed_precision={config.mixed_precision!r}: expected fp32 or bf16")
  kw = {"dtype": dtype, "remat": config.remat, "attention": config.attention}
  if config.model.pretrained:
    sd = StableDiffusion.load(config.model.pretrained, variant=config.model.variant or None,
                              allow_pickle=config.model.allow_pickle, **kw)
  else:
    sd = StableDiffusion.embedded(seed=config.model.embedded_seed,
                                  pretrained=not config.model.embedded_random, **kw)
  if config.objective == "textual_inversion":
    tokens = parse_tokens(config.textual_inversion.tokens)
    n = int(config.textual_inversion.num_vectors)
    if n < 1:
      raise MedjaxError(f"config.textual_inversion.num_vectors={n}: expected >= 1")
    sd = sd.add_tokens({t: initial_vectors(sd, w, n) for t, w in tokens})
    base = tokenizer_lib.base_tokenizer(sd.tokenizer)
    names = [name for t, _ in tokens for name in [t] + [f"{t}_{i}" for i in range(1, n)]]
    ids = tuple(int(base.convert_tokens_to_ids(name)) for name in names)
    return sd, objectives.Trainable("textual_inversion", token_ids=ids)
  parts = tuple(p for p in objectives.VAE_PARTS if config.vae[f"train_{p}"])
  return sd, objectives.Trainable(config.objective, vae_parts=parts,
                                  train_text_encoder=config.unet.train_text_encoder)


def loss_config(config: Any, sd: StableDiffusion
                ) -> objectives.LossConfig | objectives.VaeLossConfig:
  if config.objective == "vae":
    return objectives.VaeLossConfig(loss=config.vae.loss, kl_weight=float(config.vae.kl_weight))
  return objectives.LossConfig(
      prediction_type=sd.scheduler_config.get("prediction_type", "epsilon"),
      min_snr_gamma=float(config.min_snr_gamma), prior_loss_weight=float(config.prior.weight),
      scaling_factor=sd.scaling_factor, noise_offset=float(config.noise_offset))


def trainable_logical_axes(sd: StableDiffusion, trainable: objectives.Trainable) -> dict:
  if trainable.kind == "textual_inversion":
    return {"embeddings": P(None, "embed")}
  return trainable.split(sd.logical_axes())[0]


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
  frozen_axes = (trainable.split(all_axes)[1] if trainable.kind != "textual_inversion"
                 else all_axes)
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
  if trainable.kind != "vae":  # the VAE objective takes the images themselves
    step_fn = with_encoder(step_fn, sd)
  step = jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, None),
                 out_shardings=(state_sh, rep), donate_argnums=(0,))
  return Setup(sd, trainable, mesh, frozen, state, state_sh, step, schedule)


def optax_state_shardings(optimizer, params, param_sh, replicated):
  """Optimizer-state shardings: moments like their params, counters replicated."""
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_sh,
                               transform_non_params=lambda _: replicated)


def with_encoder(step_fn, sd: StableDiffusion):
  """Lets a batch carry images instead of moments (the frozen VAE encodes them in the step,
  outside the gradient) and prior rows apart (`prior_moments`, `prior_input_ids`: appended
  here, so the global row order is [instance rows; prior rows] on any process count)."""
  def step(state, frozen, batch):
    batch = dict(batch)
    if "image" in batch:
      batch["moments"] = jax.lax.stop_gradient(
          batches.vae_moments(sd, frozen["vae"], batch.pop("image")))
    if "prior_moments" in batch:
      n, m = batch["moments"].shape[0], batch["prior_moments"].shape[0]
      batch["moments"] = jnp.concatenate([batch["moments"], batch.pop("prior_moments")])
      batch["input_ids"] = jnp.concatenate([batch["input_ids"], batch.pop("prior_input_ids")])
      batch["prior"] = jnp.concatenate([jnp.zeros((n,), jnp.float32), jnp.ones((m,), jnp.float32)])
    return step_fn(state, frozen, batch)
  return step


# -- outputs ---------------------------------------------------------------------------------------

def trained_pipeline(run: Setup, state: objectives.TrainState, *, ema: bool = True
                     ) -> StableDiffusion:
  """The pipeline with the trained params merged in (EMA params when kept and asked)."""
  params = state.ema_params if ema and state.ema_params is not None else state.params
  return dataclasses.replace(run.sd, params=run.trainable.merge(params, run.frozen))


def abstract_state(run: Setup) -> Any:
  """The state's shapes, dtypes and shardings: what a checkpoint is restored onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      run.state, run.state_shardings)


def release_compiler_memory() -> None:
  """Hands the compiler's freed heap back to the OS (glibc keeps it otherwise: ~0.9 GB of RSS
  after compiling a mid-size U-Net step on CPU, benchmarks/train_step.py --malloc_trim)."""
  try:
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


def check_workdir(config: Any, workdir) -> None:
  """Refuses a workdir whose checkpoints came from another config (unless allowed)."""
  workdir = paths.workdir_path(workdir)
  old = checkpoint_lib.read_run_config(workdir)
  has_ckpt = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
  if old is None or not has_ckpt:
    return
  new = json.loads(config.to_json())
  changed = [k for k in train_config.config_diff(old, new)
             if k.split(".")[0] not in train_config.RESUMABLE_KEYS]
  if changed and not config.allow_config_change:
    raise MedjaxError(f"{workdir} holds checkpoints of another config (differs in "
                      f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); use another "
                      "--workdir or set --config.allow_config_change=True to resume anyway")


def write_config(config: Any, workdir) -> None:
  atomic.write_text(workdir / "config.json", config.to_json(indent=1) + "\n")


def check_run_config(config: Any) -> None:
  train_config.check_train_config(config)
  if config.objective == "vae" and (config.cache_latents or config.prior.enabled):
    raise MedjaxError("config.objective='vae' trains the VAE on images: set "
                      "config.cache_latents=False and config.prior.enabled=False")
  if config.cache_latents and (config.data.pipeline.flip or config.data.pipeline.crop != "center"):
    raise MedjaxError("config.cache_latents needs a deterministic pipeline: set "
                      "data.pipeline.flip=False and data.pipeline.crop='center'")
  if config.total_steps < 1:
    raise MedjaxError(f"config.total_steps={config.total_steps}: expected a positive integer")
  checkpoint_lib.check_options(config.keep_checkpoints, config.checkpoint_every_steps)


def data_state_for(extra: dict, shard: tuple[int, int], where: str) -> dict:
  """This process's data-iterator state from a checkpoint's `extra`.

  `extra['data']` lists one state per data shard (process); older single-process checkpoints
  hold one state (a dict), which only a single process can resume.
  """
  index, count = shard
  saved = extra.get("data")
  if isinstance(saved, dict):
    if count == 1:
      return saved
    saved_count = 1
  elif isinstance(saved, list):
    if len(saved) == count:
      return saved[index]
    saved_count = len(saved)
  else:
    raise MedjaxError(f"{where}: the checkpoint holds no data-iterator state")
  raise MedjaxError(f"{where}: this checkpoint holds the data positions of {saved_count} "
                    f"process(es) but this run has {count}; resume with {saved_count} "
                    "process(es) (the same launch), or start a new --workdir")


def _host_step(config: Any, step: int, every: int) -> bool:
  """Steps that read values on the host: log, checkpoint, sample grid and the last one."""
  return (step % config.log_every_steps == 0 or step % every == 0 or step >= config.total_steps
          or bool(config.sample_every_steps and step % config.sample_every_steps == 0))


def _no_host_transfers(active: bool):
  """Between host steps the loop must not wait for the devices: implicit device-to-host
  transfers raise there (explicit `jax.device_get` and `block_until_ready` stay allowed)."""
  return jax.transfer_guard_device_to_host("disallow") if active else contextlib.nullcontext()


def _non_finite(ckpt, first: int, last: int) -> MedjaxError:
  ckpt.wait()
  good = ckpt.latest_step()
  steps = f"step {last}" if first == last else f"steps {first}..{last}"
  where = (f"step {good} in {ckpt.directory}" if good is not None
           else f"none (no checkpoint in {ckpt.directory})")
  return MedjaxError(f"non-finite loss or params in {steps}; stopped without saving them. Last "
                     f"good checkpoint: {where}. Lower config.learning_rate or use fp32.")


def out_of_memory(config: Any, error: BaseException) -> MedjaxError | None:
  """XLA's RESOURCE_EXHAUSTED (from the jitted step or the state's buffers) as the knobs."""
  if not (isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)):
    return None
  first = str(error).strip().splitlines()[0][:160]
  return MedjaxError(f"out of device memory ({first}) at config.batch_size={config.batch_size}, "
                     f"config.remat={config.remat}, config.mixed_precision="
                     f"{config.mixed_precision!r}: lower config.batch_size (or raise "
                     "config.grad_accum), set config.remat=True or config.mixed_precision='bf16'")


def train(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs (or resumes) a training run; returns a summary dict (also written to the workdir).

  Cheap checks first: the config, the workdir (writable, not in use: process 0 locks it, see
  `medjax.workdir`), the data; then the model. config.json is written once the starting state
  is known (restored or fresh), so a failed restore changes nothing, and a fresh run that fails
  before its first checkpoint removes what it created.
  """
  check_run_config(config)
  distributed.maybe_initialize_distributed()
  workdir = workdir_lib.output_path(workdir)
  held = hosts.lead_only(lambda: workdir_lib.take(workdir, "medjax.train"))
  fresh = held is not None and not checkpoint_lib.has_checkpoint(workdir / "checkpoints")
  try:
    return _train(config, workdir)
  except BaseException as e:
    if fresh and not checkpoint_lib.has_checkpoint(workdir / "checkpoints"):
      held.discard()
    oom = out_of_memory(config, e)
    if oom is not None:
      raise oom from None
    raise
  finally:
    if held is not None:
      held.close()


def _train(config: ml_collections.ConfigDict, workdir) -> dict:
  check_workdir(config, workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  shard = hosts.data_shard(mesh, config.batch_size)
  data = make_dataset(config.data, "train", config.batch_size // jax.process_count(),
                      seed=config.seed, resolution=config.resolution, process_index=shard[0],
                      process_count=shard[1], drop_remainder=True, blocks=True)
  run = setup(config, mesh=mesh)
  if run.trainable.kind == "textual_inversion":
    check_prompt_lengths(run.sd, list(dict(config.data.prompt.class_prompts).values())
                         + run_outputs.sample_prompts(config))
  with checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                   every=config.checkpoint_every_steps, async_save=True) as ckpt:
    return _loop(config, workdir, run, ckpt, data, shard, hosts.is_lead())


def _loop(config, workdir, run: Setup, ckpt, data, shard, lead: bool) -> dict:
  state, start = run.state, 0
  if ckpt.latest_step() is not None:
    abstract = abstract_state(run)
    state, extra, start = ckpt.restore(abstract)
    data.set_state(data_state_for(extra, shard, f"{ckpt.directory}/{start}"))
    logging.info("resumed from step %d", start)
  if lead:  # only now: a failed restore leaves the workdir as it was
    write_config(config, workdir)
    # What it trains on, which medjax.evaluate checks against its val/test patients.
    split_file.write_records(workdir, config.data, data.records, data.class_names)
  encoder = (batches.LocalEncoder(run) if config.cache_latents or config.prior.enabled
             else None)
  cache = batches.LatentCache() if config.cache_latents else None
  generator = functools.partial(trained_pipeline, run, state, ema=False)
  prior = (batches.make_prior_images(config, run, generator, workdir, encoder)
           if config.prior.enabled else None)
  writer = metrics_writer.create_writer(workdir / "tensorboard", just_logging=not lead)
  if start == 0:
    writer.write_hparams({k: v for k, v in json.loads(config.to_json()).items()
                          if not isinstance(v, dict)})
  ckpt.watch_preemption()
  uncond = batches.uncond_setting(config)
  prefetch = batches.Prefetcher(data, lambda rows, s: batches.host_batch(
      run, rows, step=s, cache=cache, prior=prior, encoder=encoder, shard=shard, uncond=uncond),
                                start)

  def save(step: int, state, force: bool = False) -> None:
    if not force and step % ckpt.every:
      return
    entries = hosts.allgather_json({"shard": shard[0], "state": prefetch.state})
    states = [e["state"] for e in sorted(entries, key=lambda e: e["shard"])]
    ckpt.save(step, state, {"data": states}, force=force)

  images_per_step = config.batch_size * (2 if prior else 1)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, desc="train", unit="step",
                  disable=not (lead and config.progress_bar), dynamic_ncols=True)
  step, last_loss, t0, steps_done, stopped = start, float("nan"), time.perf_counter(), 0, ""
  grid = None  # the last sample grid written
  window, inflight, finite, checked = [], collections.deque(), None, start
  all_finite = jax.jit(jnp.logical_and)
  try:
    while step < config.total_steps:
      host = _host_step(config, step + 1, ckpt.every)
      # (the first step compiles: tracing may read constants such as captured arrays)
      with _no_host_transfers(not host and steps_done > 0):
        state, metrics = run.step(state, run.frozen, prefetch.next())
        finite = metrics["finite"] if finite is None else all_finite(finite, metrics["finite"])
        step += 1
        steps_done += 1
        if steps_done == 1:
          release_compiler_memory()
        # At most two steps queued ahead: the devices always have the next one, while the
        # host (and its batches) never run far ahead. A wait, not a transfer.
        inflight.append(metrics["loss"])
        if len(inflight) > 2:
          inflight.popleft().block_until_ready()
        window = (window + [time.perf_counter()])[-20:]
        bar.update(1)
        preempted = ckpt.should_stop(step)
        enough = bool(config.stop_after_steps and steps_done >= config.stop_after_steps)
      if not (host or preempted or enough):
        continue
      if not bool(jax.device_get(finite)):
        raise _non_finite(ckpt, checked + 1, step)
      finite, checked = None, step
      values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
      last_loss = values["loss"]
      rate = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
      bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate * images_per_step:.1f}")
      if step % config.log_every_steps == 0 or step == config.total_steps:
        writer.write_scalars(step, {**values, "steps_per_s": rate,
                                    "images_per_s": rate * images_per_step})
      save(step, state)
      if (config.sample_every_steps and step % config.sample_every_steps == 0
          and not preempted):  # a preempted run has seconds to save: no grid
        grid = run_outputs.write_sample_grid(config, trained_pipeline(run, state), workdir,
                                             step, writer, mesh=run.mesh)
      if preempted:
        stopped = "preempted"
        logging.warning("preempted at step %d: saving it, then exiting", step)
        break
      if enough:
        stopped = f"stop_after_steps={config.stop_after_steps}"
        break
    bar.close()
    save(step, state, force=True)
    ckpt.wait()
  finally:
    prefetch.close()
  outputs = {}
  if not stopped:
    if grid is None or not grid.name.endswith(f"{step:06d}.png"):  # not made at this step yet
      grid = run_outputs.write_sample_grid(config, trained_pipeline(run, state), workdir, step,
                                           writer, mesh=run.mesh)
    if grid is not None:
      outputs["samples"] = str(grid)
    if run.trainable.kind == "textual_inversion":
      params = state.ema_params if state.ema_params is not None else state.params
      tokens = [t for t, _ in parse_tokens(config.textual_inversion.tokens)]
      outputs["embeddings"] = [str(p) for p in run_outputs.write_embeddings(
          params["embeddings"], tokens, int(config.textual_inversion.num_vectors), workdir,
          step)]
  writer.flush()
  writer.close()
  ckpt.wait()  # a failed async save raises here, before the summary claims its step
  summary = {"step": step, "loss": last_loss, "stopped": stopped or None,
             "seconds": time.perf_counter() - t0, "checkpoints": ckpt.all_steps(),
             "skipped_files": run_outputs.skipped_files(data), **outputs,
             **provenance.train_summary(config)}  # `:paper` configs: each setting's source
  run_outputs.write_summary(workdir, summary)
  return summary
