"""Mode 'source' on the real download layouts: CheXpert-v1.0-small (train.csv + valid.csv, no
test.csv) with `source_test='val'`, and MIMIC-CXR's official train/validate/test split file.
Every patient stays in one split."""
import pytest

from medjax.data import default_config
from medjax.data import make_phantoms
from medjax.data import select_records
from medjax.errors import MedjaxError

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def chexpert_small(tmp_path_factory):
  """A CheXpert-v1.0-small tree of 120 phantom images (every tenth patient in valid.csv)."""
  out = tmp_path_factory.mktemp("chexpert_small")
  return make_phantoms.write_chexpert_phantoms(str(out), 120, size=16, seed=3)


def _config(source, root, **split):
  c = default_config()
  c.source, c.root = source, str(root)
  c.split.mode = "source"
  c.split.update(split)
  return c


def _patients(config):
  return {s: {r.patient_id for r in select_records(config, s).records} for s in SPLITS}


def test_chexpert_small_has_no_test_split_without_source_test(chexpert_small):
  config = _config("chexpert", chexpert_small)
  assert select_records(config, "val").records  # valid.csv
  with pytest.raises(MedjaxError, match=r"no test split .*source_test='val'"):
    select_records(config, "test")
  with pytest.raises(MedjaxError, match=r"source_test='valid'"):
    select_records(_config("chexpert", chexpert_small, source_test="valid"), "train")
  with pytest.raises(MedjaxError, match=r"source_val_fraction=1.0"):
    select_records(_config("chexpert", chexpert_small, source_test="val",
                           source_val_fraction=1.0), "val")


def test_chexpert_small_valid_csv_is_test_and_val_comes_from_train(chexpert_small):
  config = _config("chexpert", chexpert_small, source_test="val", source_val_fraction=0.2)
  records = {s: select_records(config, s).records for s in SPLITS}
  assert {r.source_split for r in records["test"]} == {"val"}  # valid.csv
  assert {r.source_split for r in records["train"] + records["val"]} == {"train"}
  own = {s: {r.key for r in select_records(_config("chexpert", chexpert_small), s).records}
         for s in ("train", "val")}
  assert {r.key for r in records["test"]} == own["val"]
  assert {r.key for r in records["train"]} | {r.key for r in records["val"]} == own["train"]
  patients = _patients(config)
  for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
    assert not patients[a] & patients[b], (a, b)
  share = len(records["val"]) / (len(records["train"]) + len(records["val"]))
  assert 0.1 < share < 0.3, share  # whole patients: near the asked 0.2
  assert _patients(config) == patients  # seeded: the same split every time
  other = _config("chexpert", chexpert_small, source_test="val", source_val_fraction=0.2, seed=1)
  assert _patients(other)["val"] != patients["val"]
  assert _patients(other)["test"] == patients["test"]


def test_mimic_official_split_file(mimic_root):
  config = _config("mimic", mimic_root)
  keys = {s: [r.key.split("/")[-1] for r in select_records(config, s).records] for s in SPLITS}
  assert keys == {"train": ["d1.jpg"], "val": ["d3.jpg"], "test": ["d4.jpg"]}
  patients = _patients(config)
  assert patients == {"train": {"10000032"}, "val": {"10000764"}, "test": {"11000011"}}


def test_source_split_refuses_a_patient_in_two_splits(tmp_path):
  root = make_phantoms.write_chexpert_phantoms(str(tmp_path), 30, size=16, seed=4)
  lines = (tmp_path / "CheXpert-v1.0-small" / "valid.csv").read_text().splitlines()
  train_csv = tmp_path / "CheXpert-v1.0-small" / "train.csv"
  train_lines = train_csv.read_text().splitlines()
  valid_patient = lines[1].split("/")[2]
  # A train.csv row for the valid patient's image: that patient is now in both splits.
  train_csv.write_text("\n".join(train_lines + [lines[1]]) + "\n")
  with pytest.raises(MedjaxError, match=rf"patient '{valid_patient}' is in the dataset's"):
    select_records(_config("chexpert", root), "train")
