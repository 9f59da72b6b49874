"""CheXpert and MIMIC-CXR-JPG indices built from miniature data sets in the real layouts."""
import os

import pytest

from data_testlib import CHEXPERT_HEADER, chexpert_row
from medjax.data import extract_sections, load_chexpert, load_mimic, tables
from medjax.errors import MedjaxError


def by_patient(index):
  return {r.patient_id: r for r in index.records}


def test_chexpert_frontal_only_and_paths(chexpert_root):
  index = load_chexpert(chexpert_root)
  assert [r.source_split for r in index.records].count("val") == 2
  assert all(r.view in ("AP", "PA") and os.path.isfile(r.path) for r in index.records)
  assert len(index.records) == 7  # the lateral view is left out
  with_lateral = load_chexpert(chexpert_root, frontal_only=False)
  assert len(with_lateral.records) == 8 and "LATERAL" in {r.view for r in with_lateral.records}


def test_chexpert_view_filter(chexpert_root):
  index = load_chexpert(chexpert_root, views=("ap",))
  assert {r.key.split("/")[2] for r in index.records} == {"patient00002", "patient00004"}
  assert {r.view for r in index.records} == {"AP"}
  with pytest.raises(MedjaxError, match=r"views='AP,PA': give a tuple of view names"):
    load_chexpert(chexpert_root, views="AP,PA")


@pytest.mark.parametrize("uncertainty,blank,effusion,edema_known", [
    ("ones", "zeros", 1.0, 0.0), ("zeros", "zeros", 0.0, 0.0), ("ignore", "zeros", None, 0.0),
    ("zeros", "ignore", 0.0, None)])
def test_chexpert_uncertainty_policies(chexpert_root, uncertainty, blank, effusion, edema_known):
  records = by_patient(load_chexpert(chexpert_root, uncertainty=uncertainty, blank=blank))
  uncertain = records["patient00002"]  # Pleural Effusion -1, Edema 1
  assert uncertain.labels.get("Pleural Effusion") == effusion
  assert uncertain.labels["Edema"] == 1.0
  no_finding = records["patient00003"]  # only No Finding = 1; the rest blank
  assert no_finding.labels["No Finding"] == 1.0
  assert no_finding.labels.get("Edema") == edema_known


def test_chexpert_missing_root_and_csv(tmp_path):
  with pytest.raises(MedjaxError, match="does not exist"):
    load_chexpert(tmp_path / "nowhere")
  with pytest.raises(MedjaxError, match="no CheXpert train.csv"):
    load_chexpert(tmp_path)


def test_chexpert_missing_columns(tmp_path):
  tables.write_csv(str(tmp_path / "train.csv"), ["Path", "Sex"], [["a.jpg", "Male"]])
  with pytest.raises(MedjaxError, match=r"train.csv: CSV is missing required column"):
    load_chexpert(tmp_path)


def test_chexpert_bad_label_value_error_or_skip(chexpert_root):
  rows = [chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                       Pleural_Effusion="2.0"),
          chexpert_row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg",
                       No_Finding="1.0")]
  tables.write_csv(str(chexpert_root / "train.csv"), CHEXPERT_HEADER, rows)
  with pytest.raises(MedjaxError, match=r"train.csv:2: label 'Pleural Effusion' has value '2.0'"):
    load_chexpert(chexpert_root)
  index = load_chexpert(chexpert_root, on_bad_file="skip")
  assert len(index.skipped) == 1 and "train.csv:2" in index.skipped[0]
  assert "patient00003" in {r.patient_id for r in index.records}


def test_chexpert_missing_image_error_or_skip(chexpert_root):
  os.remove(chexpert_root / "train/patient00003/study1/view1_frontal.jpg")
  with pytest.raises(MedjaxError, match=r"train.csv:5: image .*patient00003.* does not exist"):
    load_chexpert(chexpert_root)
  index = load_chexpert(chexpert_root, on_bad_file="skip")
  assert len(index.skipped) == 1 and "patient00003" not in by_patient(index)


def test_mimic_join_paths_views_and_splits(mimic_root):
  index = load_mimic(mimic_root)
  records = {r.key.rsplit("/", 1)[-1]: r for r in index.records}
  assert set(records) == {"d1.jpg", "d3.jpg", "d4.jpg"}  # lateral filtered, d5 has no labels
  assert records["d1.jpg"].key == "files/p10/p10000032/s50414267/d1.jpg"
  assert records["d1.jpg"].path == os.path.join(str(mimic_root), records["d1.jpg"].key)
  assert {k: r.source_split for k, r in records.items()} == {"d1.jpg": "train", "d3.jpg": "val",
                                                             "d4.jpg": "test"}
  assert records["d1.jpg"].labels["Pleural Effusion"] == 1.0
  assert records["d3.jpg"].labels["Pleural Effusion"] == 0.0  # uncertain -> zeros
  assert load_mimic(mimic_root, uncertainty="ones").records[1].labels["Pleural Effusion"] == 1.0
  assert {r.view for r in load_mimic(mimic_root, views=()).records} == {"PA", "AP", "LATERAL"}


def test_mimic_reports(mimic_root):
  record = load_mimic(mimic_root, reports=True).records[0]
  assert record.report["impression"] == "Right pleural effusion."
  assert record.report["findings"].startswith("Moderate right pleural effusion")
  os.remove(mimic_root / "files/p10/p10000764/s57375967.txt")
  with pytest.raises(MedjaxError, match="s57375967.txt does not exist"):
    load_mimic(mimic_root, reports=True)


def test_mimic_missing_image_and_columns(mimic_root):
  os.remove(mimic_root / "files/p11/p11000011/s51000001/d4.jpg")
  with pytest.raises(MedjaxError, match=r"metadata.csv.gz:5: image .*d4.jpg does not exist"):
    load_mimic(mimic_root)
  assert len(load_mimic(mimic_root, on_bad_file="skip").skipped) == 1
  tables.write_csv(str(mimic_root / "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id"], [["d1"]])
  with pytest.raises(MedjaxError, match=r"split.csv.gz: CSV is missing required column"):
    load_mimic(mimic_root)


def test_report_sections():
  sections = extract_sections("EXAMINATION: CHEST\nFINDINGS AND IMPRESSION:  Small  left\n"
                              "effusion.\nRECOMMENDATION(S): follow up")
  assert sections["findings"] == sections["impression"] == "Small left effusion."
  assert sections["examination"] == "CHEST"
  assert sections["recommendation(s)"] == "follow up"
  assert extract_sections("no headers here") == {"preamble": "no headers here"}
