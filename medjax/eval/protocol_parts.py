"""The pieces every evaluation protocol shares: the mesh, the model, Inception, FID, the
classifier run, and the report files (`medjax.eval.protocols` composes them per paper)."""
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from medjax import atomic
from medjax import exporter
from medjax import hosts
from medjax import sharding
from medjax.errors import MedjaxError
from medjax.eval import auc as auc_lib
from medjax.eval import classifier_train
from medjax.eval import fid as fid_lib
from medjax.eval import inception_weights
from medjax.eval import provenance
from medjax.pipeline import StableDiffusion


def eval_mesh() -> jax.sharding.Mesh:
  """Every device of every process on the data axis: batches split, params replicated."""
  return sharding.make_mesh(-1, 1)


def positive_index(config: Any, class_names) -> int:
  if config.positive_class not in class_names:
    raise MedjaxError(f"config.positive_class={config.positive_class!r} is not one of the "
                      f"data classes {list(class_names)} (config.data.classes)")
  return class_names.index(config.positive_class)


def binary(split, pos: int) -> np.ndarray:
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
    sd = StableDiffusion.embedded(seed=m.embedded_seed, pretrained=not m.embedded_random)
  sd = sd.load_embeddings(list(m.embeddings)) if m.embeddings else sd
  if mesh is None:
    return sd
  return dataclasses.replace(sd, params=hosts.to_global(sd.params,
                                                              sharding.replicated(mesh)))


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


def fid_between(config: Any, params, a, b, mesh=None) -> float:
  """FID between two image sets (the first `fid.max_images` of each): stores (read batch by
  batch, statistics merged as they come) or arrays in [-1, 1]."""
  cap = config.fid.max_images or None
  sets = []
  for name, x in (("first", a), ("second", b)):
    x = x.head(cap) if hasattr(x, "head") else (np.asarray(x)[:cap] + 1) / 2
    if len(x) < 2:
      raise MedjaxError(f"FID: the {name} image set has {len(x)} image(s); at least 2 needed")
    sets.append(x)
  stats = [fid_lib.inception_statistics(params, x, batch_size=config.fid.batch_size, mesh=mesh,
                                        resize=config.fid.resize, dims=config.fid.dims)
           for x in sets]
  return float(fid_lib.frechet_distance(*stats[0], *stats[1]))


def train_and_score(config: Any, train, val, test, pos: int, seed: int, mesh=None):
  """Trains the configured classifier (over `mesh`) reading batches from the stores; returns
  (scores on test, metrics, state)."""
  cfg = ml_collections.ConfigDict(config.classifier.to_dict())
  cfg.seed = seed
  cfg.task = "binary"
  state, history = classifier_train.train_classifier(
      cfg, (train, binary(train, pos)), (val, binary(val, pos)), mesh=mesh)
  scores = classifier_train.predict(state, test, cfg.predict_batch_size, mesh=mesh)
  y = binary(test, pos)
  metrics = {"auc": auc_lib.roc_auc(y, scores), **auc_lib.threshold_metrics(y, scores),
             "best_step": history.get("best_step")}
  return scores, metrics, state


# -- reports -------------------------------------------------------------------------------------

def write_report(workdir, results: dict, table: list[list[str]], title: str,
                 config=None, sections=()) -> None:
  """results.json, results.md (temp file + rename, by process 0); `config`'s provenance too.
  `sections`: (title, table) pairs shown as '## title' after the main table."""
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
  for name, part in sections:
    lines += section(name, part)
  lines += provenance.markdown(results["settings"])
  atomic.write_text(workdir / "results.md", "\n".join(lines) + "\n")


def section(title: str, table: list[list[str]]) -> list[str]:
  """A '## title' section (after a blank line) holding `table` (its first row the header)."""
  head, *body = table
  return ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
      "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]


def _json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def fmt(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}f}"
