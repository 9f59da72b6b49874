"""MIMIC-CXR-JPG index: metadata, CheXpert labels and official split, joined per image.

Images live at `files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg`; free-text
reports (from MIMIC-CXR) at `files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt`.
"""
import os
from collections.abc import Sequence

from absl import logging

from medjax.data import labels as labels_lib
from medjax.data import records as records_lib
from medjax.data import reports as reports_lib
from medjax.data import tables
from medjax.data.chexpert import parse_views
from medjax.errors import MedjaxError

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
  """Relative path of one MIMIC-CXR-JPG image."""
  return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_path(subject_id: str, study_id: str) -> str:
  """Relative path of one MIMIC-CXR study report."""
  return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


def _id(value: str) -> str:
  value = value.strip()
  return value[:-2] if value.endswith(".0") else value  # pandas-written CSVs: '10000032.0'


def load_mimic(root, *, views: Sequence[str] = ("PA", "AP"), uncertainty: str = "zeros",
               blank: str = "zeros", reports: bool = False, reports_dir: str = "",
               check_files: bool = True, on_bad_file: str = "error") -> records_lib.DataIndex:
  """Indexes MIMIC-CXR-JPG images with CheXpert labels, official split and optional reports.

  Args:
    root: directory holding the three `mimic-cxr-2.0.0-*.csv.gz` files and `files/`.
    views: keep these `ViewPosition` values (e.g. ('PA', 'AP')); empty keeps all.
    uncertainty, blank: label policies, as for CheXpert.
    reports: attach FINDINGS / IMPRESSION sections from the study's `.txt` report.
    reports_dir: root of the report tree (`files/...`); defaults to `root`.
    check_files: stat every image (and report) now.
    on_bad_file: 'error' or 'skip'.

  Studies without a CheXpert label row are left out (their findings are unknown, so neither a
  class nor a 'no finding' prompt would be honest); their number is logged.
  """
  root = tables.check_root(root, "MIMIC-CXR-JPG")
  labels_lib.check_policies(uncertainty, blank, "MIMIC-CXR")
  views = parse_views(views)
  bad = records_lib.BadFiles(on_bad_file)
  reports_dir = reports_dir or root

  labels_csv = os.path.join(root, CHEXPERT)
  study_labels = {}
  for line, row in tables.read_csv(labels_csv, ["subject_id", "study_id",
                                                *labels_lib.CHEXPERT_LABELS]):
    try:
      study_labels[(_id(row["subject_id"]), _id(row["study_id"]))] = labels_lib.parse_labels(
          row, uncertainty=uncertainty, blank=blank, where=f"{labels_csv}:{line}")
    except MedjaxError as e:
      bad(str(e))

  split_csv = os.path.join(root, SPLIT)
  splits = {}
  for _, row in tables.read_csv(split_csv, ["dicom_id", "split"]):
    splits[row["dicom_id"].strip()] = records_lib.source_split_name(row["split"])

  metadata_csv = os.path.join(root, METADATA)
  out, unlabeled = [], 0
  for line, row in tables.read_csv(metadata_csv, ["dicom_id", "subject_id", "study_id",
                                                  "ViewPosition"]):
    where = f"{metadata_csv}:{line}"
    view = row["ViewPosition"].strip().upper()
    if views and view not in views:
      continue
    dicom_id, subject, study = row["dicom_id"].strip(), _id(row["subject_id"]), _id(row["study_id"])
    labels = study_labels.get((subject, study))
    if labels is None:
      unlabeled += 1
      continue
    relative = image_path(subject, study, dicom_id)
    path = os.path.join(root, relative)
    if check_files and not os.path.isfile(path):
      bad(f"{where}: image {relative} does not exist under {root}")
      continue
    report = None
    if reports:
      text_path = os.path.join(reports_dir, report_path(subject, study))
      try:
        with open(text_path, encoding="utf-8", errors="replace") as f:
          report = reports_lib.extract_sections(f.read())
      except OSError:
        bad(f"{where}: report {text_path} does not exist")
        continue
    out.append(records_lib.Record(
        key=relative, patient_id=subject, kind="file", path=path, labels=labels,
        modality="chest x-ray", view=view, source_split=splits.get(dicom_id, ""), report=report))
  if unlabeled:
    logging.info("MIMIC-CXR: left out %d images whose study has no CheXpert label row", unlabeled)
  return records_lib.DataIndex(records=out, label_names=labels_lib.CHEXPERT_LABELS,
                               source="mimic", skipped=bad.skipped)
