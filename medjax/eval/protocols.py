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
and the VAE round trip are split over every device. Process 0 writes each evaluation split
once into a store in the (shared) workdir; every process then reads each batch from it and
feeds its devices' rows; results come back to every process (`medjax.hosts.to_host`).
Process 0 alone writes files; the others wait for it.

Memory stays bounded whatever a split's size: splits, generated images and reconstructions
go batch by batch into on-disk stores under workdir/stores (`medjax.eval.image_sets`).
"""
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from medjax import atomic
from medjax import exporter
from medjax import hosts
from medjax import paths
from medjax import workdir as workdir_lib
from medjax.data.defaults import default_config as data_config
from medjax.errors import MedjaxError
from medjax.eval import auc as auc_lib
from medjax.eval import classifier_train
from medjax.eval import image_sets
from medjax.eval import image_store
from medjax.eval import leakage
from medjax.eval import memorization
from medjax.eval import privacy_report
from medjax.eval import recon
from medjax.eval.image_sets import Split  # noqa: F401  (re-exported)
from medjax.eval.image_sets import class_prompts  # noqa: F401
from medjax.eval.image_sets import generate_per_class
from medjax.eval.image_sets import load_split
from medjax.eval.image_sets import streamed_store
from medjax.eval.protocol_parts import binary
from medjax.eval.protocol_parts import eval_mesh
from medjax.eval.protocol_parts import fid_between
from medjax.eval.protocol_parts import fid_notes
from medjax.eval.protocol_parts import fmt
from medjax.eval.protocol_parts import inception_params
from medjax.eval.protocol_parts import load_model
from medjax.eval.protocol_parts import positive_index
from medjax.eval.protocol_parts import train_and_score
from medjax.eval.protocol_parts import write_report
from medjax.train_config import check_train_config

PROTOCOLS: dict[str, Callable] = {}
# Free-form maps of an eval config: their keys are class names, not config keys.
FREE_MAPS = ("data.prompt.class_prompts", "data.prompt.label_texts", "generation.prompts")


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
  c.model.embedded_random = False  # '' pretrained: random weights (embedded_seed) for the tiny SD
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
  c.recon.resolutions = ()  # paper B's VAE table, one row group each; () = (resolution,)

  # The privacy audit (eval/privacy_report.py): protocol 'privacy', and paper A / B after
  # generation when enabled. The embedded default: pixel features, 2 queries per image
  # (mirrored), 3 candidates: ~3 s of an evaluation on a 2-core CPU.
  c.privacy = memorization.default_config()
  c.privacy.features = "pixels"
  c.privacy.top_k = 3
  c.privacy.query_shifts = (0,)
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
  classifier (ResNet-18, lr 1e-4, batch 32, 6,250 steps, 196 px) and 200/200/200 splits; and
  our privacy audit after generation, with shifted queries."""
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
  c.privacy.enabled = True
  c.privacy.features = "inception"
  c.privacy.top_k = 5
  c.privacy.query_shifts = (-2, 0, 2)
  c.privacy.batch_size = 32
  return c


SETTINGS = ("real", "synthetic", "real+synthetic")  # paper A's classifier training sets


# -- paper A ---------------------------------------------------------------------------------------

@register("paper_a")
def paper_a(config: Any, workdir, mesh=None) -> dict:
  """Real vs real + synthetic vs synthetic-only classifiers; FID of generated vs training."""
  workdir, mesh = paths.workdir_path(workdir), mesh or eval_mesh()
  facts, leak_notes = leakage.check_generator(config)  # before anything slow
  params, note = inception_params(config)  # a bad weights file fails before any data or model
  train, val, test = (load_split(config, s, workdir) for s in ("train", "val", "test"))
  pos = positive_index(config, train.class_names)
  for name, split in (("train", train), ("val", val), ("test", test)):
    if len(np.unique(binary(split, pos))) < 2:
      raise MedjaxError(f"the {name} split holds one class only ({len(split.labels)} images): "
                        "AUC needs both; use more images (config.data.split.sizes)")
  settings = list(config.settings)
  unknown = [s for s in settings if s not in SETTINGS]
  if unknown:
    raise MedjaxError(f"config.settings: unknown {unknown}; expected {list(SETTINGS)}")
  sd = load_model(config, mesh)
  synth = generate_per_class(config, sd, train.class_names, workdir, mesh)
  audit = _audit(config, sd, synth, train, {"val": val, "test": test}, workdir, mesh, params)
  sets = {"real": train, "synthetic": synth,
          "real+synthetic": image_store.Chain([train, synth])}
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
  ref_name, ref, ref_notes = image_sets.fid_reference(config, train, test, workdir)
  fid = {"reference": ref_name, "all": fid_between(config, params, synth, ref, mesh),
         "vs_test": fid_between(config, params, synth, test, mesh)}
  for k, name in enumerate(train.class_names):
    a, b = synth.subset(synth.labels == k), ref.subset(ref.labels == k)
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
  sections = _audit_report(results, audit)
  table = [["training set", "AUC (mean ± std)", "repeats", "accuracy (mean)"]]
  for s in settings:
    acc = np.mean([r["accuracy"] for r in runs[s]])
    table.append([s, f"{fmt(summary[s]['mean'])} ± {fmt(summary[s]['std'])}",
                  str(summary[s]["n"]), fmt(acc)])
  table.append([f"FID generated vs {ref_name}", fmt(fid["all"], 2), "", ""])
  table.append(["FID generated vs real test split", fmt(fid["vs_test"], 2), "", ""])
  write_report(workdir, results, table, "Paper A protocol: classifier AUC with synthetic data",
               config, sections)
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
  facts, leak_notes = leakage.check_generator(config)  # before anything slow
  params, note = inception_params(config)  # a bad weights file fails before any data or model
  train, val, test = (load_split(config, s, workdir) for s in ("train", "val", "test"))
  pos = positive_index(config, train.class_names)
  sd = load_model(config, mesh)
  # VAE study on real test images, at each resolution of the table.
  by_resolution = {}
  for resolution in config.recon.resolutions or (config.resolution,):
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution % 8 or \
        resolution < 16:
      raise MedjaxError(f"config.recon.resolutions: {resolution!r} is not a multiple of 8 "
                        "(the VAE's downsampling) of at least 16 pixels")
    real = test if resolution == config.resolution else load_split(config, "test", workdir,
                                                                   resolution)
    by_resolution[str(resolution)] = vae_table_row(config, sd, params, real, workdir, mesh)
  recon_metrics = by_resolution.get(str(config.resolution), next(iter(by_resolution.values())))
  # Classifier on real images, then on generated ones.
  real_scores, real_metrics, state = train_and_score(config, train, val, test, pos, config.seed,
                                                     mesh)
  synth = generate_per_class(config, sd, train.class_names, workdir, mesh)
  audit = _audit(config, sd, synth, train, {"val": val, "test": test}, workdir, mesh, params)
  scores = classifier_train.predict(state, synth, config.classifier.predict_batch_size,
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
             "vae_reconstruction_by_resolution": by_resolution,
             "classifier_real_test": real_metrics, "classifier_on_generated": generated,
             **facts, "notes": leak_notes + fid_notes(config, note)}
  sections = _audit_report(results, audit)
  table = [["measure", "value"]]
  for resolution, row in by_resolution.items():
    for k in ("rmse", "psnr", "ssim", "ms_ssim", "fid"):
      if row.get(k) is not None:
        table.append([f"VAE reconstruction {k.upper()} ({resolution} px)", fmt(float(row[k]))])
  table.append(["classifier AUC, real test", fmt(real_metrics["auc"])])
  table.append(["classifier AUC, generated images", fmt(generated["auc"])])
  table.append(["classifier accuracy, generated images", fmt(generated["accuracy"])])
  for name, m in per_class.items():
    table.append([f"accuracy on generated '{name}'", fmt(m["accuracy"])])
  write_report(workdir, results, table, "Paper B protocol: VAE reconstruction and classifier",
               config, sections)
  return results


def vae_table_row(config: Any, sd, params, real, workdir, mesh=None) -> dict:
  """VAE round trip of the first `recon.num_images` of `real` (a store): the reconstruction
  metrics, and the FID of the reconstructions (streamed into a store) against the originals."""
  originals = real.head(config.recon.num_images)
  size = originals.shape[0]

  def produce(add):
    return recon.vae_roundtrip(sd, originals, batch_size=config.recon.batch_size, mesh=mesh,
                               sink=lambda decoded: add(decoded, np.zeros(len(decoded))))[0]

  metrics, reconstructed = streamed_store(workdir, f"recon_{size}px", "", real.class_names,
                                          produce)
  metrics["fid"] = fid_between(config, params, reconstructed, originals, mesh)
  metrics["resolution"] = size
  return metrics


def _audit(config: Any, sd, synth, train, splits: dict, workdir, mesh, params) -> dict | None:
  """The privacy audit of the generated images (`config.privacy.enabled`): its section."""
  if not config.privacy.enabled:
    return None
  return privacy_report.audit_store(config, synth, train, workdir, mesh, params,
                                    held=splits[config.privacy.heldout_split], sd=sd)


def _audit_report(results: dict, section: dict | None) -> list:
  """Puts the audit's section (if any) into `results`; its results.md sections."""
  if section is None:
    return []
  results["notes"] += section.pop("notes")
  results["privacy"] = section
  return [(privacy_report.TITLE, privacy_report.rows(section))]


@register("privacy")
def privacy(config: Any, workdir, mesh=None) -> dict:
  """Memorisation audit alone: flags generated images that near-copy an image the generator
  trained on (by record key), calibrated on held-out real images (eval/privacy_report.py)."""
  workdir, mesh = paths.workdir_path(workdir), mesh or eval_mesh()
  facts, notes = leakage.check_generator(config)  # before anything slow
  params = None
  if config.privacy.features == "inception":
    params, note = inception_params(config)  # a bad weights file fails before any data or model
    notes += [note] if note else []
  train = load_split(config, "train", workdir)
  sd = load_model(config, mesh)
  synth = generate_per_class(config, sd, train.class_names, workdir, mesh)
  section = privacy_report.audit_store(config, synth, train, workdir, mesh, params, sd=sd)
  notes += section.pop("notes")
  results = {"protocol": "privacy", **section, **facts, "notes": notes}
  write_report(workdir, results, privacy_report.rows(section), privacy_report.TITLE, config)
  return results


def run_protocol(config: Any, workdir) -> dict:
  """Runs `config.protocol`; with several processes, call it on all (see the module docstring).

  Every process returns the same results; process 0 has written the files when it returns.
  """
  check_train_config(config, base_config(),
                     free_maps=FREE_MAPS)
  classifier_train.check_config(config.classifier)
  privacy_report.check_config(config.privacy)
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
