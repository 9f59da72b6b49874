"""CheXpert index: `train.csv` / `valid.csv` (and `test.csv` if present) under a root.

The CSV `Path` column starts with the archive folder name (`CheXpert-v1.0-small/train/...`), so
paths resolve against the root or its parent, whichever holds the file.
"""
import os
import re
from collections.abc import Sequence

from medjax.data import labels as labels_lib
from medjax.data import records as records_lib
from medjax.data import tables
from medjax.errors import MedjaxError

CSV_SPLITS = (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test"))
_PATIENT = re.compile(r"(patient\d+)")


def _patient_id(path: str) -> str | None:
  match = _PATIENT.search(path)
  if match:
    return match.group(1)
  parts = path.replace("\\", "/").split("/")
  return parts[-3] if len(parts) >= 3 else None


class _PathResolver:
  """Finds which base directory CSV paths are relative to, then sticks to it."""

  def __init__(self, bases, check_files: bool):
    self.bases = list(bases)
    self.check_files = check_files
    self.settled = False

  def __call__(self, relative: str) -> str | None:
    if self.settled and not self.check_files:
      return os.path.join(self.bases[0], relative)
    for i, base in enumerate(self.bases):
      path = os.path.join(base, relative)
      if os.path.isfile(path):
        if i:
          self.bases.insert(0, self.bases.pop(i))
        self.settled = True
        return path
    return None if self.check_files else os.path.join(self.bases[0], relative)


def _has_csv(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, name)) for name, _ in CSV_SPLITS)


def _csv_directory(root: str) -> str:
  """`root` itself, or its single sub-folder holding the CSVs (e.g. CheXpert-v1.0-small/)."""
  if _has_csv(root):
    return root
  found = sorted(os.path.join(root, d) for d in os.listdir(root)
                 if os.path.isdir(os.path.join(root, d)) and _has_csv(os.path.join(root, d)))
  if len(found) == 1:
    return found[0]
  if found:
    raise MedjaxError(f"{root}: several CheXpert folders {found}; set the root to one of them")
  raise MedjaxError(f"{root}: no CheXpert train.csv or valid.csv in this directory")


def parse_views(views: Sequence[str]) -> tuple:
  """('ap', 'PA') -> ('AP', 'PA'); () means any view."""
  if isinstance(views, str):
    raise MedjaxError(f"views={views!r}: give a tuple of view names, e.g. ('AP', 'PA')")
  return tuple(v.strip().upper() for v in views if v and v.strip())


def load_chexpert(root, *, frontal_only: bool = True, views: Sequence[str] = (),
                  uncertainty: str = "zeros", blank: str = "zeros", check_files: bool = True,
                  on_bad_file: str = "error") -> records_lib.DataIndex:
  """Indexes CheXpert images with their 14 labels.

  Args:
    root: directory holding `train.csv` and/or `valid.csv` (or its parent).
    frontal_only: keep rows whose `Frontal/Lateral` is 'Frontal'.
    views: keep only these `AP/PA` values (e.g. ('AP', 'PA')); empty keeps all.
    uncertainty: -1 cells become 1 ('ones'), 0 ('zeros') or unknown ('ignore').
    blank: blank cells become 0 ('zeros') or unknown ('ignore').
    check_files: stat every image so a missing file is found now, not mid-training.
    on_bad_file: 'error' raises on the first bad row; 'skip' drops it and reports it.

  Returns:
    A DataIndex whose records carry `source_split` train/val/test from the CSV they came from.
  """
  root = tables.check_root(root, "CheXpert")
  labels_lib.check_policies(uncertainty, blank, "CheXpert")
  views = parse_views(views)
  bad = records_lib.BadFiles(on_bad_file)
  root = _csv_directory(root)
  csv_paths = [(os.path.join(root, name), split) for name, split in CSV_SPLITS
               if os.path.isfile(os.path.join(root, name))]
  required = ["Path", *labels_lib.CHEXPERT_LABELS]
  if frontal_only:
    required.append("Frontal/Lateral")
  if views:
    required.append("AP/PA")
  resolver = _PathResolver((root, os.path.dirname(os.path.abspath(root))), check_files)
  out = []
  for csv_path, split in csv_paths:
    for line, row in tables.read_csv(csv_path, required):
      where = f"{csv_path}:{line}"
      frontal = row.get("Frontal/Lateral", "").strip()
      view = row.get("AP/PA", "").strip().upper()
      if frontal_only and frontal != "Frontal":
        continue
      if views and view not in views:
        continue
      try:
        labels = labels_lib.parse_labels(row, uncertainty=uncertainty, blank=blank, where=where)
      except MedjaxError as e:
        bad(str(e))
        continue
      relative = row["Path"].strip()
      patient = _patient_id(relative)
      if not relative or patient is None:
        bad(f"{where}: cannot find a patient id in Path {relative!r}")
        continue
      path = resolver(relative)
      if path is None:
        bad(f"{where}: image {relative!r} does not exist under {root} or its parent")
        continue
      out.append(records_lib.Record(
          key=relative, patient_id=patient, kind="file", path=path, labels=labels,
          modality="chest x-ray",
          view=view if frontal == "Frontal" or not frontal else "LATERAL",
          source_split=split))
  return records_lib.DataIndex(records=out, label_names=labels_lib.CHEXPERT_LABELS,
                               source="chexpert", skipped=bad.skipped)
