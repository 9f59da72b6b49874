"""Miniature data sets in the real on-disk layouts, built in temp dirs."""
import numpy as np
import pytest

from data_testlib import CHEXPERT_HEADER, REPORT, chexpert_row, save_png, write_csv_gz
from medjax.data import labels as labels_lib
from medjax.data import make_phantoms
from medjax.data import tables


@pytest.fixture
def chexpert_root(tmp_path):
  """CheXpert-v1.0-small layout: 6 patients, frontal + lateral, uncertain and blank labels."""
  root = tmp_path / "CheXpert-v1.0-small"
  train, valid = [], []
  specs = [  # (patient, study, view file, frontal, AP/PA, labels)
      (1, 1, "view1_frontal", "Frontal", "PA", dict(Pleural_Effusion="1.0")),
      (1, 1, "view2_lateral", "Lateral", "", dict(Pleural_Effusion="1.0")),
      (2, 1, "view1_frontal", "Frontal", "AP", dict(Pleural_Effusion="-1.0", Edema="1.0")),
      (3, 1, "view1_frontal", "Frontal", "PA", dict(No_Finding="1.0")),
      (4, 1, "view1_frontal", "Frontal", "AP", dict(No_Finding="1.0", Pleural_Effusion="0.0")),
      (4, 2, "view1_frontal", "Frontal", "PA", dict(Pleural_Effusion="1")),
  ]
  rng = np.random.default_rng(0)
  for patient, study, view_file, frontal, view, labels in specs:
    relative = f"CheXpert-v1.0-small/train/patient{patient:05d}/study{study}/{view_file}.jpg"
    save_png(str(tmp_path / relative), rng.integers(0, 255, (40, 32), dtype=np.uint8))
    train.append(chexpert_row(relative, frontal, view, **labels))
  for patient in (64541, 64542):
    relative = f"CheXpert-v1.0-small/valid/patient{patient}/study1/view1_frontal.jpg"
    save_png(str(tmp_path / relative), rng.integers(0, 255, (40, 32), dtype=np.uint8))
    valid.append(chexpert_row(relative, "Frontal", "PA", Cardiomegaly="1.0"))
  tables.write_csv(str(root / "train.csv"), CHEXPERT_HEADER, train)
  tables.write_csv(str(root / "valid.csv"), CHEXPERT_HEADER, valid)
  return root


@pytest.fixture
def mimic_root(tmp_path):
  """MIMIC-CXR-JPG layout: 3 subjects, PA/AP/LATERAL images, labels, split and reports."""
  root = tmp_path / "mimic-cxr-jpg"
  images = [  # dicom_id, subject, study, view, split
      ("d1", "10000032", "50414267", "PA", "train"),
      ("d2", "10000032", "50414267", "LATERAL", "train"),
      ("d3", "10000764", "57375967", "AP", "validate"),
      ("d4", "11000011", "51000001", "PA", "test"),
      ("d5", "11000099", "59999999", "PA", "train"),  # study without a label row
  ]
  rng = np.random.default_rng(1)
  for dicom_id, subject, study, _, _ in images:
    path = root / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
    save_png(str(path), rng.integers(0, 255, (36, 30), dtype=np.uint8))
  write_csv_gz(str(root / "mimic-cxr-2.0.0-metadata.csv.gz"),
               ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"],
               [(d, s, st, v, 36, 30) for d, s, st, v, _ in images])
  write_csv_gz(str(root / "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id",
                                                            "split"],
               [(d, st, s, sp) for d, s, st, _, sp in images])
  label_rows = []
  for subject, study, cells in (("10000032", "50414267", {"Pleural Effusion": "1.0"}),
                                ("10000764", "57375967", {"Pleural Effusion": "-1.0"}),
                                ("11000011", "51000001", {"No Finding": "1.0"})):
    label_rows.append([subject, study, *[cells.get(n, "") for n in labels_lib.CHEXPERT_LABELS]])
  write_csv_gz(str(root / "mimic-cxr-2.0.0-chexpert.csv.gz"),
               ["subject_id", "study_id", *labels_lib.CHEXPERT_LABELS], label_rows)
  for _, subject, study, _, _ in images:
    report = root / f"files/p{subject[:2]}/p{subject}/s{study}.txt"
    report.write_text(REPORT)
  return root


@pytest.fixture(scope="session")
def picai_root(tmp_path_factory):
  """Four phantom studies in the PI-CAI layout (T2W 64 x 64 x 12, ADC/HBV on a coarser grid)."""
  out = tmp_path_factory.mktemp("picai")
  make_phantoms.write_picai_phantoms(str(out), 4, size=64, slices=12, seed=5, lesion_fraction=0.5)
  return out
