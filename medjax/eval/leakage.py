"""Which patients a generator trained on, checked against the evaluation's val/test patients.

A generator fine-tuned (or a textual inversion learned) on test patients makes synthetic images
that carry those patients into the classifier's training set: the real+synthetic AUC then
measures leakage, not augmentation. `check` refuses such a generator in one line. The
generator's patients come from the `records.json` its training workdir wrote
(`medjax.data.split_file`): config.model.train_workdir, config.model.generator_workdirs, and the
workdirs that hold the files in config.model.embeddings.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from medjax import checkpoint as checkpoint_lib
from medjax import train_config
from medjax.data import select_records
from medjax.data import split_file
from medjax.data.records import Record
from medjax.errors import MedjaxError

# An embedding file sits at <workdir>/embeddings/<format>/<token>.safetensors.
_EMBEDDING_DEPTH = 3


def generator_workdirs(model: Any) -> list[epath.Path]:
  """The training workdirs behind the generator being evaluated (config.model)."""
  found = [epath.Path(d) for d in (model.train_workdir, *model.generator_workdirs) if d]
  for name in model.embeddings:
    for parent in list(epath.Path(name).parents)[:_EMBEDDING_DEPTH]:
      if (parent / split_file.RECORDS_FILE).exists():
        found.append(parent)
        break
  out = []
  for d in found:
    if d.resolve() not in [o.resolve() for o in out]:
      out.append(d)
  return out


def generator_records(model: Any) -> tuple[list[tuple[epath.Path, dict]], list[str]]:
  """(workdir, its records.json) per generator training run, and notes on what is unknown."""
  runs, notes = [], []
  for workdir in generator_workdirs(model):
    doc = split_file.read_records(workdir)
    if doc is None:
      notes.append(f"{workdir} has no records.json (trained by an older medjax?): its "
                   "training patients are unknown and were not checked for leakage")
    else:
      runs.append((workdir, doc))
  if model.embeddings and not runs:
    notes.append("the embedding files do not sit in medjax training workdirs: their training "
                 "patients are unknown and were not checked for leakage (set "
                 "config.model.generator_workdirs)")
  return runs, notes


def same_dataset(a: Mapping, b: Mapping) -> bool:
  """Same source and root (phantoms: same kind and seed, whatever their pool size)."""
  if a.get("source") != b.get("source") or a.get("root") != b.get("root"):
    return False
  pa, pb = a.get("phantoms") or {}, b.get("phantoms") or {}
  return all(pa.get(k) == pb.get(k) for k in ("kind", "seed"))


def check(data_config: Any, split_records: Mapping[str, Sequence[Record]],
          runs: Sequence[tuple[epath.Path, dict]]) -> list[dict]:
  """Raises if a generator trained on a val/test patient; returns a summary per generator."""
  ours = split_file.dataset_id(data_config)
  held_out = {s: {r.patient_id for r in split_records.get(s, ())} for s in ("val", "test")}
  train = {r.patient_id for r in split_records.get("train", ())}
  out = []
  for workdir, doc in runs:
    trained = {row["patient"] for row in doc["records"]}
    summary = {"workdir": str(workdir), "records": len(doc["records"]), "patients": len(trained),
               "split_file": doc.get("split_file", ""),
               "same_dataset": same_dataset(doc.get("dataset", {}), ours)}
    if summary["same_dataset"]:
      for split, patients in held_out.items():
        overlap = sorted(trained & patients)
        if overlap:
          raise MedjaxError(
              f"the generator trained in {workdir} used {len(overlap)} patient(s) of this "
              f"evaluation's {split} split (e.g. {overlap[0]}): its images would leak them "
              "into the scores; train it on the evaluation's split file "
              "(config.data.split.file) or evaluate it on other patients")
      summary["patients_in_eval_train"] = len(trained & train)
    else:
      logging.info("generator %s trained on another dataset (%s): no shared patients",
                   workdir, doc.get("dataset"))
    out.append(summary)
  return out


def generator_data_configs(config: Any, runs: Sequence[tuple[epath.Path, dict]]
                           ) -> list[tuple[epath.Path, ml_collections.ConfigDict]]:
  """Each generator run's own data config (from its config.json), to re-read its images."""
  out = []
  for workdir, _ in runs:
    raw = checkpoint_lib.read_run_config(workdir)
    if raw is None:
      raise MedjaxError(f"{workdir}: no config.json; cannot read the generator's training "
                        "images (config.fid.reference='generator_train', the privacy audit)")
    data = train_config.from_saved(raw).data
    c = ml_collections.ConfigDict(config.to_dict())
    c.data = data
    out.append((workdir, c))
  return out


def check_generator(config: Any) -> tuple[dict, list[str]]:
  """Refuses a generator trained on this evaluation's val/test patients (`medjax.eval.leakage`).

  Returns the report's split and generator facts, and notes on what could not be checked.
  """
  records = {s: select_records(config.data, s).records for s in ("train", "val", "test")}
  runs, notes = generator_records(config.model)
  facts = {"splits": {"file": config.data.split.file,
                      "patients": {s: split_file.patients(r) for s, r in records.items()}},
           "generators": check(config.data, records, runs)}
  return facts, notes
