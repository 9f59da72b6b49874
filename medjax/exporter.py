"""A medjax model as a diffusers directory PyTorch can load, or as one single-file checkpoint
(AUTOMATIC1111, ComfyUI), written safely.

The output is written to a temporary path, reloaded and checked against the in-memory model,
then renamed into place, so an interrupted or faulty export never leaves an output that looks
usable. `python -m medjax.export` is its command line.

A training workdir's checkpoint is restored onto whatever devices this run has (`restore_pipeline`:
orbax reshards, so a checkpoint written by N processes with FSDP-split params loads in one), and
with several processes onto all of them.
"""
import dataclasses
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from medjax import checkpoint as checkpoint_lib
from medjax import hosts
from medjax import paths
from medjax import sharding
from medjax import train_config
from medjax import trainer
from medjax import workdir as workdir_lib
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion

FORMATS = ("diffusers", "single_file")


def check_target(out_dir, source: str = "", *, overwrite: bool = False,
                 fmt: str = "diffusers") -> Path:
  """The resolved export path, refused before anything is loaded when it is, is inside or
  contains `source` (symlinks resolved), exists without `overwrite`, is not an export of the
  format (`overwrite` replaces only those), or cannot be written."""
  if fmt not in FORMATS:
    raise MedjaxError(f"--format={fmt!r}; expected one of {', '.join(FORMATS)}")
  if not os.fspath(out_dir).strip():
    raise MedjaxError("--to is empty: give the diffusers directory (or .safetensors file) to "
                      "write")
  out = Path(os.path.realpath(os.path.expanduser(out_dir)))
  single = fmt == "single_file"
  if single and out.suffix != ".safetensors":
    raise MedjaxError(f"--to={out_dir}: --format=single_file writes a .safetensors file")
  if source and not paths.is_url(source):
    src = Path(os.path.realpath(os.path.expanduser(source)))
    where = ("is" if out == src else "is inside" if src in out.parents
             else "contains" if out in src.parents else None)
    if where:
      raise MedjaxError(f"--to={out_dir} {where} --from={source}; export to another directory")
  if os.path.lexists(out):
    if not overwrite:
      raise MedjaxError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    if single and not out.is_file():
      raise MedjaxError(f"--to={out_dir}: not a file; --overwrite replaces only a "
                        ".safetensors file")
    if not single and not is_diffusers_export(out):
      raise MedjaxError(f"--to={out_dir}: not a diffusers export (no model_index.json"
                        f"{', a training workdir' if is_training_workdir(out) else ''}); "
                        "--overwrite replaces only those")
  workdir_lib.check_dir(out.parent if single else out, "--to")
  return out


def is_diffusers_export(path) -> bool:
  path = Path(path)
  return (path / "model_index.json").is_file() and not (path / "checkpoints").exists()


def export(sd: StableDiffusion, out_dir, *, overwrite: bool = False, dtype="float32",
           source: str = "", fmt: str = "diffusers") -> float:
  """Writes `sd` to `out_dir` (a diffusers directory, or with fmt='single_file' one
  `.safetensors` checkpoint) and returns the max abs difference of a reload's forward pass.

  The output appears complete or not at all: written beside it, checked, then renamed; a folder
  it replaces is moved aside first and removed last (put back if the rename fails).
  """
  out_dir = check_target(out_dir, source, overwrite=overwrite, fmt=fmt)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  if fmt == "single_file":
    staging = out_dir.with_name(f".{out_dir.stem}.new.safetensors")
    try:
      sd.save_single_file(staging, dtype=np_dtype)
      error = verify_reload(sd, staging, single_file=True)
      os.replace(staging, out_dir)
    except BaseException:
      staging.unlink(missing_ok=True)
      raise
    return error
  staging = out_dir.with_name(f".{out_dir.name}.new")
  if staging.exists():  # a killed export's (complete) staging folder
    shutil.rmtree(staging)
  try:
    sd.save_pretrained(staging, dtype=np_dtype)
    error = verify_reload(sd, staging)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
      if old.exists():
        shutil.rmtree(old)
      out_dir.rename(old)
    try:
      staging.rename(out_dir)
    except BaseException:
      if old.exists() and not out_dir.exists():
        old.rename(out_dir)
      raise
    if old.exists():
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return error


def verify_reload(sd: StableDiffusion, path, *, single_file: bool = False) -> float:
  """Reloads `path` and compares a full forward (prompt -> U-Net -> VAE) with `sd`'s."""
  other = (StableDiffusion.from_single_file(path) if single_file
           else StableDiffusion.from_pretrained(path))
  size = int(sd.configs["unet"].get("sample_size", 8))
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, size, size, sd.latent_channels)).astype(np.float32)
  results = []
  for model in (sd, other):
    emb = model.encode_prompt(["a chest x-ray with pleural effusion"])
    eps = model.predict_noise(latents, np.array([500]), emb)
    img = model.decode_latents(eps)
    results.append(np.asarray(img, np.float32))
  return float(np.max(np.abs(results[0] - results[1])))


def is_training_workdir(path) -> bool:
  path = paths.workdir_path(path)
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def default_mesh() -> jax.sharding.Mesh:
  """One device with one process; with several, every device (each process must call)."""
  if jax.process_count() == 1:
    return sharding.make_mesh(1, 1, devices=jax.local_devices()[:1])
  return sharding.make_mesh(-1, 1)


def restore_pipeline(workdir, *, step: int | None = None, ema: bool = True,
                     mesh: jax.sharding.Mesh | None = None) -> StableDiffusion:
  """A workdir's trained pipeline (base model + checkpointed params) on `mesh`.

  The mesh is of choice (default `default_mesh()`): the run's
  config with this mesh, the state restored onto its shardings (params split by the run's
  `mesh.rules` over this mesh's `fsdp` axis, replicated over `data`). With several processes
  every process calls it with the same mesh.
  """
  workdir = paths.workdir_path(workdir)
  raw = checkpoint_lib.read_run_config(workdir)
  if raw is None:
    raise MedjaxError(f"{workdir}: no config.json; not a medjax training workdir")
  mesh = mesh or default_mesh()
  config = train_config.from_saved(raw)
  config.mesh.data, config.mesh.fsdp = mesh.shape[sharding.DATA], mesh.shape[sharding.FSDP]
  config.batch_size, config.grad_accum = sharding.data_parallel_size(mesh), 1
  run = trainer.setup(config, mesh=mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  abstract = trainer.abstract_state(run)
  try:
    state, _, _ = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return trainer.trained_pipeline(run, state, ema=ema)


def load_source(source: str, *, seed: int = 0, embedded_random: bool = False,
                step: int | None = None, ema: bool = True,
                allow_pickle: bool = False) -> StableDiffusion:
  """A training workdir, '' (the embedded model), or any weights `StableDiffusion.load` reads
  (a diffusers directory, a single file, a Hugging Face id in the local cache).

  The params come back as host (NumPy) arrays on every process, ready to write.
  """
  if source and is_training_workdir(source):
    sd = restore_pipeline(source, step=step, ema=ema)
    return dataclasses.replace(sd, params=hosts.to_host(sd.params))
  if not source:
    return StableDiffusion.embedded(seed=seed, pretrained=not embedded_random)
  return StableDiffusion.load(source, allow_pickle=allow_pickle)
