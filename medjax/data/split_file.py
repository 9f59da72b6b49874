"""One patient-level split per dataset, computed once and kept in a file every stage reads.

Why: a generator (textual inversion, U-Net fine-tuning) and the evaluation that scores it must
draw from the same split, or the generator can train on the evaluation's val/test patients and
inflate the real+synthetic AUC. With `config.data.split.file` set, the first stage that reads
the data computes the split (mode/sizes/fractions/seed as configured, over the configured
classes) and writes the file; every later stage reads it instead of re-splitting, and refuses a
config whose split settings differ from the file's.

A training run records the records it trained on (`records.json` in its workdir) so that
`medjax.evaluate` can check them against its own splits (`medjax.eval.leakage`).

Both files hold record keys, dataset pseudonyms (e.g. CheXpert's 'patient00001') and class
names only: never identifiers from DICOM headers.
"""
import json
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from etils import epath

from medjax import atomic
from medjax.data import splits as splits_lib
from medjax.data.records import Record
from medjax.errors import MedjaxError

SPLIT_FORMAT = "medjax.split/1"
RECORDS_FORMAT = "medjax.records/1"
RECORDS_FILE = "records.json"
# Split settings that decide the assignment: a file made with other values is refused.
_SETTINGS = ("mode", "fractions", "sizes", "seed", "source_test", "source_val_fraction")


def dataset_id(config: Any) -> dict:
  """What identifies the dataset: source, root, and for phantoms their generator settings."""
  out = {"source": config.source or "phantoms", "root": str(config.root)}
  if out["source"] == "phantoms":
    p = config.phantoms
    out["phantoms"] = {k: p[k] for k in ("kind", "num", "seed", "effusion_fraction",
                                         "cardiomegaly_fraction", "lesion_fraction")}
  return json.loads(json.dumps(out))


def _settings(split_config: Any) -> dict:
  return json.loads(json.dumps({k: split_config[k] for k in _SETTINGS}))


def compute(records: Sequence[Record], split_config: Any,
            class_names: Sequence[str]) -> dict[str, str]:
  """record key -> 'train' | 'val' | 'test' under the configured mode (unlisted: unused)."""
  s = split_config
  out = {}
  for split in splits_lib.SPLITS:
    for record in splits_lib.split_records(records, split, mode=s.mode, fractions=s.fractions,
                                           sizes=s.sizes, seed=s.seed, class_names=class_names,
                                           source_test=s.source_test,
                                           source_val_fraction=s.source_val_fraction):
      out[record.key] = split
  return out


def _write(path: str, config: Any, records: Sequence[Record], assignment: dict[str, str],
           class_names: Sequence[str]) -> None:
  rows = [{"key": r.key, "patient": r.patient_id, "split": assignment[r.key],
           "class": class_names[r.class_index] if 0 <= r.class_index < len(class_names) else ""}
          for r in sorted(records, key=lambda r: r.key) if r.key in assignment]
  counts = {s: sum(row["split"] == s for row in rows) for s in splits_lib.SPLITS}
  doc = {"format": SPLIT_FORMAT, "dataset": dataset_id(config), "classes": list(class_names),
         "settings": _settings(config.split), "counts": counts, "records": rows}
  atomic.write_text(path, json.dumps(doc, indent=0) + "\n")
  logging.info("medjax.data: wrote the split %s to %s", counts, path)


def _read(path: str) -> dict:
  try:
    doc = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise MedjaxError(f"config.data.split.file={path}: cannot read it as a medjax split file "
                      f"({type(e).__name__}: {e})") from None
  if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
    raise MedjaxError(f"config.data.split.file={path}: not a medjax split file (expected "
                      f"format {SPLIT_FORMAT!r})")
  return doc


def _check_same(path: str, what: str, theirs: Any, ours: Any) -> None:
  if theirs != ours:
    raise MedjaxError(f"config.data.split.file={path} was made for {what} {theirs}, but the "
                      f"config has {ours}: match the file, or name a new split file")


def assignment(config: Any, records: Sequence[Record],
               class_names: Sequence[str]) -> dict[str, str]:
  """record key -> split from `config.split.file`, creating the file on first use.

  `config` is `config.data`; `records` have their classes assigned. Every process computes the
  same split (it depends only on the records and the split settings); process 0 writes it.
  """
  path = str(config.split.file)
  if not epath.Path(path).exists():
    result = compute(records, config.split, class_names)
    if jax.process_index() == 0:
      _write(path, config, records, result, class_names)
    return result
  doc = _read(path)
  _check_same(path, "the dataset", doc.get("dataset"), dataset_id(config))
  _check_same(path, "the classes", doc.get("classes"), list(class_names))
  _check_same(path, "the split settings", doc.get("settings"), _settings(config.split))
  result = {row["key"]: row["split"] for row in doc["records"]}
  present = {r.key for r in records}
  missing = [key for key in result if key not in present]
  if missing:
    message = (f"config.data.split.file={path}: {len(missing)} of its {len(result)} records "
               f"are not in the dataset now (e.g. {missing[0]})")
    if config.on_bad_file != "skip":
      raise MedjaxError(message + "; was the dataset changed? (on_bad_file='skip' goes on "
                        "without them)")
    logging.warning("medjax.data: %s; going on without them", message)
  return result


# -- what a training run trained on -----------------------------------------------------------

def write_records(workdir, config: Any, records: Sequence[Record],
                  class_names: Sequence[str]) -> None:
  """`records.json` in a training workdir: its dataset, split file and training records."""
  rows = [{"key": r.key, "patient": r.patient_id,
           "class": class_names[r.class_index] if 0 <= r.class_index < len(class_names) else ""}
          for r in records]
  doc = {"format": RECORDS_FORMAT, "dataset": dataset_id(config), "split": "train",
         "split_file": str(config.split.file), "split_settings": _settings(config.split),
         "patients": len({r.patient_id for r in records}), "records": rows}
  atomic.write_text(epath.Path(workdir) / RECORDS_FILE, json.dumps(doc, indent=0) + "\n")


def read_records(workdir) -> dict | None:
  """A training workdir's `records.json`, or None if it has none (older runs, other tools)."""
  path = epath.Path(workdir) / RECORDS_FILE
  if not path.exists():
    return None
  try:
    doc = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise MedjaxError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(doc, dict) or doc.get("format") != RECORDS_FORMAT:
    raise MedjaxError(f"{path}: not a medjax records file (expected format {RECORDS_FORMAT!r})")
  return doc


def patients(records: Sequence[Record]) -> list[str]:
  return sorted({r.patient_id for r in records})
