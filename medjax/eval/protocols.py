"""The two papers' evaluation protocols, each a function of a config and a workdir.

paper_a  (de Wilde et al.) a classifier trained on N real images vs N real + M synthetic vs
         synthetic only, AUC on a real test split over repeats (mean +- std), FID between the
         generated images and the real training images.
paper_b  (Chambon et al.) the VAE's reconstruction table (RMSE, PSNR, SSIM, MS-SSIM, FID of the
         reconstructions) and a classifier trained on real images scoring generated images per
         prompt class (accuracy, AUC).
Both write results.json, results.md, ROC PNGs and sample grids into the workdir.

Multi-process (`launch/local.py`, SLURM, TPU pods): every process runs the whole protocol over
one mesh of all devices (`eval_mesh`), so generation, classifier training, Inception features
and the VAE round trip are split over every device. Each process reads the (small) evaluation
splits in full and feeds its devices' rows of each batch; results come back to every process
(`medjax.hosts.to_host`). Process 0 alone writes files; the others wait for it.
"""
import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from medjax import atomic
from medjax import exporter
from medjax import hosts
from medjax import images as images_lib
from medjax import paths
from medjax import sharding
from medjax import workdir as workdir_lib
from medjax.data import make_dataset
from medjax.data import select_records
from medjax.data import split_file
from medjax.data.defaults import default_config as data_config
from medjax.errors import MedjaxError
from medjax.eval import auc as auc_lib
from medjax.eval import classifier_train
from medjax.eval import fid as fid_lib
from medjax.eval import inception_weights
from medjax.eval import leakage
from medjax.eval import memorization
from medjax.eval import provenance
from medjax.eval import recon
from medjax.pipeline import StableDiffusion
from medjax.train_config import check_train_config

PROTOCOLS: dict[str, Callable] = {}


def register(name: str):
  def wrap(fn):
    PROTOCOLS[name] = fn
    return fn
  return wrap


def base_config() -> ml_collections.ConfigDict:
  """Every evaluation key with defaults sized for the embedded tiny model (minutes on a CPU)."""
  c = ml_collections.ConfigDict()
  c.protocol = "paper_a"  # a key of PROTOCOLS
  c.seed = 0
  c.resolution = 64  # generated and real images (pixels)

  c.model = ml_collections.ConfigDict()
  # a diffusers directory, a single-file checkpoint or a Hugging Face id in the local cache
  # (medjax.convert.sources); '' = the embedded tiny SD
  c.model.pretrained = ""
  c.model.allow_pickle = False  # read a .ckpt/.pt pretrained (torch.load(weights_only=True))
  c.model.embedded_seed = 0
  c.model.train_workdir = ""  # a medjax training workdir: use its trained pipeline instead
  c.model.embeddings = ()  # textual-inversion files to load (diffusers or A1111)
  # Training workdirs of the generator (beyond train_workdir and the workdirs holding the
  # embedding files): their records.json are checked against the val/test patients.
  c.model.generator_workdirs = ()

  c.data = data_config()
  c.positive_class = "pleural_effusion"  # the class scored as positive in AUCs

  c.generation = ml_collections.ConfigDict()
  c.generation.prompts = ml_collections.ConfigDict()  # class -> prompt; empty = data prompts
  c.generation.num_per_class = 8  # paper A: M = 2,000 synthetic images in all
  c.generation.num_inference_steps = 10
  c.generation.guidance_scale = 7.5
  c.generation.scheduler = "ddim"
  c.generation.batch_size = 8

  c.classifier = classifier_train.default_config()
  c.classifier.image_size = 32
  c.classifier.num_steps = 30
  c.classifier.batch_size = 8
  c.classifier.progress = False
  c.repeats = 2  # paper A: 5
  c.settings = ("real", "real+synthetic", "synthetic")  # paper A's three training sets

  c.fid = ml_collections.ConfigDict()
  c.fid.weights = ""  # pytorch-fid's pt_inception-2015-12-05-*.pth; '' = the usual places
  c.fid.allow_pickle = False  # a .pth weights file needs this (torch.load weights_only=True)
  c.fid.random_weights = True  # no weights file: random Inception (relative numbers only)
  c.fid.resize = "pytorch-fid"  # or 'clean' (clean-fid's PIL bicubic)
  c.fid.batch_size = 16
  c.fid.max_images = 16  # per set; 0 = all
  # Only the first `dims` of the 2048 pool features (0 = all: pytorch-fid's FID). The embedded
  # default uses 64 since the 2048 x 2048 matrix square root takes minutes on a small CPU.
  c.fid.dims = 64
  # FID of the generated images against: 'generator_train' (paper A: the images the generator
  # was trained on, read from its workdirs; the real train split when none is known), 'train'
  # (the evaluation's real train split) or 'test'. The held-out test split is always added.
  c.fid.reference = "generator_train"

  c.recon = ml_collections.ConfigDict()
  c.recon.num_images = 8
  c.recon.batch_size = 4

  c.privacy = memorization.default_config()  # protocol 'privacy'
  c.bootstrap = 200  # resamples for AUC confidence intervals; 0 = off
  c.progress_bar = True
  return c


CLASSES = {
    "cxr": ("pleural_effusion", (("pleural_effusion", {"Pleural Effusion": 1}),
                                 ("no_finding", {"No Finding": 1}))),
    "mri": ("diseased", (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))),
}


def protocol_config(protocol: str, modality: str, prompts: dict) -> ml_collections.ConfigDict:
  """`base_config()` for one protocol on one modality's two classes (phantoms by default)."""
  c = base_config()
  c.protocol = protocol
  c.positive_class, c.data.classes = CLASSES[modality]
  c.data.phantoms.kind = modality
  c.data.phantoms.num = 96
  c.data.split.mode = "sizes"
  c.data.split.sizes = (24, 16, 16)
  c.generation.prompts = prompts
  return c


def paper_scale(c: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
  """The papers' sizes: 512 px real data, pytorch-fid's full FID with real weights, paper A's
  classifier (ResNet-18, lr 1e-4, batch 32, 6,250 steps, 196 px) and 200/200/200 splits."""
  c.resolution = 512
  c.data.source = source
  c.data.split.sizes = (200, 200, 200)
  c.generation.num_per_class = 1000  # M = 2,000 synthetic images
  c.generation.num_inference_steps = 50
  c.generation.batch_size = 16
  c.classifier.image_size = 196
  c.classifier.num_steps = 6250
  c.classifier.batch_size = 32
  c.classifier.learning_rate = 1e-4
  c.classifier.progress = True
  c.repeats = 5
  c.fid.random_weights = False
  c.fid.max_images = 0
  c.fid.dims = 0
  c.fid.batch_size = 50
  c.bootstrap = 1000
  return c


# -- shared pieces -------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
  images: np.ndarray  # [N, H, W, 3] in [-1, 1]
  labels: np.ndarray  # [N] class index
  class_names: tuple


def eval_mesh() -> jax.sharding.Mesh:
  """Every device of every process on the data axis: batches split, params replicated."""
  return sharding.make_mesh(-1, 1)


def load_split(config: Any, split: str) -> Split:
  """All images of one split, in order, as arrays (every process reads the whole split)."""
  data = make_dataset(config.data, split, batch_size=8, seed=config.seed,
                      resolution=config.resolution, process_index=0, process_count=1,
                      num_epochs=1, shuffle=False, drop_remainder=False)
  images, labels = [], []
  for batch in data:
    images.append(np.asarray(batch["image"], np.float32))
    labels.append(np.asarray(batch["label"]))
  if not images:
    raise MedjaxError(f"config.data: the {split!r} split is empty")
  return Split(np.concatenate(images), np.concatenate(labels), tuple(data.class_names))


def check_generator(config: Any) -> tuple[dict, list[str]]:
  """Refuses a generator trained on this evaluation's val/test patients (`medjax.eval.leakage`).

  Returns the report's split and generator facts, and notes on what could not be checked.
  """
  records = {s: select_records(config.data, s).records for s in ("train", "val", "test")}
  runs, notes = leakage.generator_records(config.model)
  facts = {"splits": {"file": config.data.split.file,
                      "patients": {s: split_file.patients(r) for s, r in records.items()}},
           "generators": leakage.check(config.data, records, runs)}
  return facts, notes


def fid_reference(config: Any, train: Split, test: Split) -> tuple[str, Split, list[str]]:
  """The real images FID compares against (`config.fid.reference`), its name and notes."""
  ref = config.fid.reference
  if ref == "train":
    return "real train split", train, []
  if ref == "test":
    return "real test split", test, []
  if ref != "generator_train":
    raise MedjaxError(f"config.fid.reference={ref!r}: expected 'generator_train', 'train' or "
                      "'test'")
  runs, _ = leakage.generator_records(config.model)
  if not runs:
    return "real train split", train, [
        "FID reference: the generator's training images are unknown (no training workdir "
        "with records.json), so FID is against the evaluation's real train split"]
  parts = [load_split(c, "train") for _, c in leakage.generator_data_configs(config, runs)]
  names = train.class_names
  labels = [np.array([names.index(p.class_names[k]) if p.class_names[k] in names else -1
                      for k in p.labels]) for p in parts]
  return "generator's training images", Split(np.concatenate([p.images for p in parts]),
                                              np.concatenate(labels), names), []


def positive_index(config: Any, class_names) -> int:
  if config.positive_class not in class_names:
    raise MedjaxError(f"config.positive_class={config.positive_class!r} is not one of the "
                      f"data classes {list(class_names)} (config.data.classes)")
  return class_names.index(config.positive_class)


def binary(split: Split, pos: int) -> np.ndarray:
  return (split.labels == pos).astype(np.float32)


def load_model(config: Any, mesh: jax.sharding.Mesh | None = None):
  """The pipeline to generate with: a training workdir, or base weights + embedding files.

  With `mesh`, its params are replicated over the mesh (which may span processes).
  """
  m = config.model
  if m.train_workdir:
    sd = exporter.restore_pipeline(m.train_workdir, mesh=mesh)
    sd = dataclasses.replace(sd, params=hosts.to_host(sd.params))
  elif m.pretrained:
    sd = StableDiffusion.load(m.pretrained, allow_pickle=m.allow_pickle)
  else:
    sd = StableDiffusion.embedded(seed=m.embedded_seed)
  sd = sd.load_embeddings(list(m.embeddings)) if m.embeddings else sd
  if mesh is None:
    return sd
  return dataclasses.replace(sd, params=hosts.to_global(sd.params,
                                                              sharding.replicated(mesh)))


def class_prompts(config: Any, class_names) -> dict[str, str]:
  given = dict(config.generation.prompts)
  base = dict(config.data.prompt.class_prompts)
  out = {}
  for name in class_names:
    prompt = given.get(name) or base.get(name)
    if not prompt:
      raise MedjaxError(f"no prompt for class {name!r}: set config.generation.prompts.{name}")
    out[name] = prompt
  return out


def generate_per_class(config: Any, sd, class_names, workdir, mesh=None) -> Split:
  """`num_per_class` images per class prompt (seeded), plus a grid PNG per class.

  With `mesh`, each batch is split over its data axis (padded with extra seeds to a multiple of
  its size; an image depends only on its own seed, so the padding changes no image).
  """
  g = config.generation
  per = 1 if mesh is None else mesh.shape[sharding.DATA]
  prompts = class_prompts(config, class_names)
  images, labels = [], []
  total = g.num_per_class * len(class_names)
  bar = tqdm.tqdm(total=total, desc="generate", unit="img",
                  disable=not (config.progress_bar and hosts.is_lead()))
  for k, name in enumerate(class_names):
    kept = []
    for start in range(0, g.num_per_class, g.batch_size):
      n = min(g.batch_size, g.num_per_class - start)
      padded = -(-n // per) * per
      seeds = [config.seed * 1_000_003 + k * 100_003 + start + i for i in range(padded)]
      out = sd.generate([prompts[name]] * padded, num_inference_steps=g.num_inference_steps,
                        guidance_scale=g.guidance_scale, scheduler=g.scheduler,
                        height=config.resolution, width=config.resolution, seed=seeds, mesh=mesh,
                        data_axis=sharding.DATA)
      kept.append(np.asarray(out)[:n])
      bar.update(n)
    class_images = np.concatenate(kept)
    images.append(class_images * 2 - 1)
    labels.append(np.full(len(class_images), k))
    if hosts.is_lead():
      grid = images_lib.grid(images_lib.to_uint8(class_images[:16]))
      images_lib.save_png(grid, workdir / f"samples_{name}.png",
                          {"synthetic": "true", "generator": "medjax.evaluate",
                           "prompt": prompts[name], "model": sd.name})
  bar.close()
  return Split(np.concatenate(images), np.concatenate(labels), tuple(class_names))


def inception_params(config: Any):
  """pytorch-fid's weights, or (when allowed) random ones with a warning in the results.

  The random fallback applies only when no weights file was named (`fid.weights` empty and
  $MEDJAX_INCEPTION_WEIGHTS unset): a named file that is missing, unreadable or not the
  Inception is an error naming it, never an FID that means nothing.
  """
  named = config.fid.weights or os.environ.get(inception_weights.ENV_VAR)
  try:
    return inception_weights.load_inception(config.fid.weights or None,
                                            allow_pickle=config.fid.allow_pickle), None
  except MedjaxError as e:
    if named or not config.fid.random_weights:
      raise
    note = ("FID computed with a randomly initialised Inception (no pytorch-fid weights "
            "found): compare these numbers only with each other. " + str(e).split(";")[0])
    logging.warning(note)
    return inception_weights.random_inception(config.seed), note


def fid_notes(config: Any, weights_note: str | None) -> list[str]:
  notes = [weights_note] if weights_note else []
  if config.fid.dims:
    notes.append(f"FID over the first {config.fid.dims} of 2048 Inception features and at most "
                 f"{config.fid.max_images or 'all'} images per set (config.fid.dims / "
                 "max_images): not comparable with published FIDs.")
  return notes


def fid_between(config: Any, params, a: np.ndarray, b: np.ndarray, mesh=None) -> float:
  """FID between two image sets in [-1, 1] (the first `fid.max_images` of each)."""
  cap = config.fid.max_images or None
  a, b = a[:cap], b[:cap]
  for name, x in (("first", a), ("second", b)):
    if len(x) < 2:
      raise MedjaxError(f"FID: the {name} image set has {len(x)} image(s); at least 2 needed")
  feats = [fid_lib.inception_features(params, (x + 1) / 2, batch_size=config.fid.batch_size,
                                      mesh=mesh, resize=config.fid.resize) for x in (a, b)]
  if config.fid.dims:
    feats = [f[:, :config.fid.dims] for f in feats]
  return float(fid_lib.frechet_distance(*fid_lib.statistics(feats[0]),
                                        *fid_lib.statistics(feats[1])))


def train_and_score(config: Any, train: Split, val: Split, test: Split, pos: int, seed: int,
                    mesh=None):
  """Trains the configured classifier (over `mesh`); returns (scores on test, metrics, state)."""
  cfg = ml_collections.ConfigDict(config.classifier.to_dict())
  cfg.seed = seed
  cfg.task = "binary"
  state, history = classifier_train.train_classifier(
      cfg, (train.images, binary(train, pos)), (val.images, binary(val, pos)), mesh=mesh)
  scores = classifier_train.predict(state, test.images, cfg.predict_batch_size, mesh=mesh)
  y = binary(test, pos)
  metrics = {"auc": auc_lib.roc_auc(y, scores), **auc_lib.threshold_metrics(y, scores),
             "best_step": history.get("best_step")}
  return scores, metrics, state


# -- reports -------------------------------------------------------------------------------------

def write_report(workdir, results: dict, table: list[list[str]], title: str,
                 config=None) -> None:
  """results.json, results.md (temp file + rename, by process 0); `config`'s provenance too."""
  results["settings"] = provenance.settings(config) if config is not None else []
  if not hosts.is_lead():
    return
  atomic.write_text(workdir / "results.json", json.dumps(results, indent=1, default=_json) + "\n")
  lines = [f"# {title}", ""]
  if results.get("notes"):
    lines += [f"> {n}" for n in results["notes"]] + [""]
  head, *rows = table
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  lines += provenance.markdown(results["settings"])
  atomic.write_text(workdir / "results.md", "\n".join(lines) + "\n")


def _json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def fmt(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}f}"


# -- paper A ---------------------------------------------------------------------------------------

@register("paper_a")
def paper_a(config: Any, workdir, mesh=None) -> dict:
  """Real vs real + synthetic vs synthetic-only classifiers; FID of generated vs training."""
  workdir, mesh = paths.workdir_path(workdir), mesh or eval_mesh()
  facts, leak_notes = check_generator(config)  # before anything slow
  train, val, test = (load_split(config, s) for s in ("train", "val", "test"))
  pos = positive_index(config, train.class_names)
  for name, split in (("train", train), ("val", val), ("test", test)):
    if len(np.unique(binary(split, pos))) < 2:
      raise MedjaxError(f"the {name} split holds one class only ({len(split.labels)} images): "
                        "AUC needs both; use more images (config.data.split.sizes)")
  params, note = inception_params(config)  # a bad weights file fails before any generation
  sd = load_model(config, mesh)
  synth = generate_per_class(config, sd, train.class_names, workdir, mesh)
  sets = {"real": train, "synthetic": synth,
          "real+synthetic": Split(np.concatenate([train.images, synth.images]),
                                  np.concatenate([train.labels, synth.labels]),
                                  train.class_names)}
  settings = list(config.settings)
  unknown = [s for s in settings if s not in sets]
  if unknown:
    raise MedjaxError(f"config.settings: unknown {unknown}; expected {list(sets)}")
  runs = {s: [] for s in settings}
  curves = {}
  y_test = binary(test, pos)
  for repeat in range(config.repeats):
    for s in settings:
      scores, metrics, _ = train_and_score(config, sets[s], val, test, pos,
                                           config.seed + repeat, mesh)
      runs[s].append(metrics)
      if repeat == 0:
        fpr, tpr, _ = auc_lib.roc_curve(y_test, scores)
        curves[s] = (fpr, tpr, metrics["auc"])
        if config.bootstrap:
          metrics["auc_ci"] = auc_lib.bootstrap_ci(y_test, scores, n=config.bootstrap,
                                                   seed=config.seed)
  ref_name, ref, ref_notes = fid_reference(config, train, test)
  fid = {"reference": ref_name, "all": fid_between(config, params, synth.images, ref.images, mesh),
         "vs_test": fid_between(config, params, synth.images, test.images, mesh)}
  for k, name in enumerate(train.class_names):
    a, b = synth.images[synth.labels == k], ref.images[ref.labels == k]
    if len(a) >= 2 and len(b) >= 2:
      fid[name] = fid_between(config, params, a, b, mesh)
  if hosts.is_lead():
    auc_lib.plot_roc(curves, workdir / "roc.png", title="Test ROC (repeat 1)")
  summary = {s: _mean_std([r["auc"] for r in runs[s]]) for s in settings}
  results = {"protocol": "paper_a", "summary_auc": summary, "runs": runs, "fid": fid,
             "sizes": {"real_train": len(train.labels), "synthetic": len(synth.labels),
                       "val": len(val.labels), "test": len(test.labels)},
             "classifier": config.classifier.to_dict(), **facts,
             "notes": leak_notes + ref_notes + fid_notes(config, note)}
  table = [["training set", "AUC (mean ± std)", "repeats", "accuracy (mean)"]]
  for s in settings:
    acc = np.mean([r["accuracy"] for r in runs[s]])
    table.append([s, f"{fmt(summary[s]['mean'])} ± {fmt(summary[s]['std'])}",
                  str(summary[s]["n"]), fmt(acc)])
  table.append([f"FID generated vs {ref_name}", fmt(fid["all"], 2), "", ""])
  table.append(["FID generated vs real test split", fmt(fid["vs_test"], 2), "", ""])
  write_report(workdir, results, table, "Paper A protocol: classifier AUC with synthetic data",
               config)
  return results


def _mean_std(values) -> dict:
  values = np.asarray(values, np.float64)
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "n": int(values.size)}


# -- paper B ---------------------------------------------------------------------------------------

@register("paper_b")
def paper_b(config: Any, workdir, mesh=None) -> dict:
  """VAE reconstruction table; a real-trained classifier scoring generated images per class."""
  workdir, mesh = paths.workdir_path(workdir), mesh or eval_mesh()
  facts, leak_notes = check_generator(config)  # before anything slow
  train, val, test = (load_split(config, s) for s in ("train", "val", "test"))
  pos = positive_index(config, train.class_names)
  params, note = inception_params(config)  # a bad weights file fails before any generation
  sd = load_model(config, mesh)
  # VAE study on real test images.
  originals = test.images[:config.recon.num_images]
  recon_metrics, decoded = recon.vae_roundtrip(sd, (originals + 1) / 2,
                                               batch_size=config.recon.batch_size, mesh=mesh)
  reconstructed = np.clip(decoded, -1, 1)
  recon_metrics["fid"] = fid_between(config, params, reconstructed, originals, mesh)
  # Classifier on real images, then on generated ones.
  real_scores, real_metrics, state = train_and_score(config, train, val, test, pos, config.seed,
                                                     mesh)
  synth = generate_per_class(config, sd, train.class_names, workdir, mesh)
  scores = classifier_train.predict(state, synth.images, config.classifier.predict_batch_size,
                                    mesh=mesh)
  y = binary(synth, pos)
  per_class = {name: {"accuracy": float(np.mean((scores[synth.labels == k] >= 0.5)
                                                == (k == pos)))}
               for k, name in enumerate(train.class_names)}
  generated = {"auc": auc_lib.roc_auc(y, scores), "accuracy": auc_lib.accuracy(y, scores),
               "per_class": per_class}
  fpr, tpr, _ = auc_lib.roc_curve(binary(test, pos), real_scores)
  gfpr, gtpr, _ = auc_lib.roc_curve(y, scores)
  if hosts.is_lead():
    auc_lib.plot_roc({"real test": (fpr, tpr, real_metrics["auc"]),
                      "generated": (gfpr, gtpr, generated["auc"])}, workdir / "roc.png",
                     title="Classifier trained on real images")
  results = {"protocol": "paper_b", "vae_reconstruction": recon_metrics,
             "classifier_real_test": real_metrics, "classifier_on_generated": generated,
             **facts, "notes": leak_notes + fid_notes(config, note)}
  table = [["measure", "value"]]
  for k in ("rmse", "psnr", "ssim", "ms_ssim", "fid"):
    if recon_metrics.get(k) is not None:
      table.append([f"VAE reconstruction {k.upper()}", fmt(float(recon_metrics[k]))])
  table.append(["classifier AUC, real test", fmt(real_metrics["auc"])])
  table.append(["classifier AUC, generated images", fmt(generated["auc"])])
  table.append(["classifier accuracy, generated images", fmt(generated["accuracy"])])
  for name, m in per_class.items():
    table.append([f"accuracy on generated '{name}'", fmt(m["accuracy"])])
  write_report(workdir, results, table, "Paper B protocol: VAE reconstruction and classifier",
               config)
  return results


@register("privacy")
def privacy(config: Any, workdir, mesh=None) -> dict:
  """Memorisation audit: flags generated images that near-copy a training image (by record
  key), calibrated on held-out real images (medjax.eval.memorization)."""
  workdir, mesh = paths.workdir_path(workdir), mesh or eval_mesh()
  facts, notes = check_generator(config)  # before anything slow
  p, mem = config.privacy, memorization
  opt = mem.Options.from_config(p)
  opt.check()
  train, held = (mem.read_split(config.data, s, config.resolution, p.batch_size, config.seed)
                 for s in ("train", p.heldout_split))
  if p.features not in ("inception", "pixels"):
    raise MedjaxError(f"config.privacy.features={p.features!r}: expected 'inception' or 'pixels'")
  feature_fn = mem.pixel_feature_fn()
  if p.features == "inception":
    params, note = inception_params(config)
    notes += [note] if note else []
    feature_fn = mem.inception_feature_fn(params, config.fid.batch_size, mesh, config.fid.resize)
  synth = generate_per_class(config, load_model(config, mesh), train[2], workdir, mesh)
  keys = [f"generated/{train[2][c]}/{i}" for i, c in enumerate(synth.labels)]
  result = mem.audit(mem.array_batches(synth.images, keys, p.batch_size),
                     mem.array_batches(*held[:2], p.batch_size),
                     mem.array_batches(*train[:2], p.batch_size), mem.array_fetch(*train[:2]),
                     feature_fn, opt, mesh)
  if hosts.is_lead():
    mem.plot_histograms(result, workdir / "privacy_distances.png")
    mem.save_gallery(result, workdir / "privacy_pairs.png")
  results = {"protocol": "privacy", **mem.public(result), **facts, "notes": notes}
  t = result["thresholds"]
  table = [["measure", "value"], ["generated / held-out / training images",
                                  f"{result['num_generated']} / {result['num_heldout']} / "
                                  f"{result['num_train']}"],
           ["flagged generated images", f"{result['flagged']} ({result['fraction_flagged']:.2%})"],
           ["held-out images flagged by the same rule", f"{result['heldout_flag_rate']:.2%}"],
           ["distance threshold", fmt(t["distance"], 4)], ["SSIM threshold", fmt(t["ssim"], 4)],
           ["rule", result["rule"]]]
  write_report(workdir, results, table, "Privacy audit: near-copies of training images", config)
  return results


def run_protocol(config: Any, workdir) -> dict:
  """Runs `config.protocol`; with several processes, call it on all (see the module docstring).

  Every process returns the same results; process 0 has written the files when it returns.
  """
  check_train_config(config, base_config(),
                     free_maps=("data.prompt.class_prompts", "data.prompt.label_texts",
                                "generation.prompts"))
  classifier_train.check_config(config.classifier)
  if config.protocol not in PROTOCOLS:
    raise MedjaxError(f"config.protocol={config.protocol!r}: expected one of {list(PROTOCOLS)}")
  workdir = workdir_lib.output_path(workdir)
  if exporter.is_training_workdir(workdir):
    raise MedjaxError(f"--workdir={workdir} is a training workdir; evaluation would replace its "
                      "config.json: use another --workdir (config.model.train_workdir evaluates "
                      "that run)")
  held = hosts.lead_only(lambda: workdir_lib.take(workdir, "medjax.evaluate"))
  try:
    if hosts.is_lead():
      atomic.write_text(workdir / "config.json", config.to_json(indent=1) + "\n")
    mesh = eval_mesh()
    logging.info("evaluation mesh: %d devices %s over %d process(es)", mesh.devices.size,
                 dict(mesh.shape), jax.process_count())
    results = PROTOCOLS[config.protocol](config, workdir, mesh)
    hosts.sync("medjax.evaluate: results written")
  finally:
    if held is not None:
      held.close()
  return results
