"""The shared split file: patient-disjoint, written once, read by every stage, checked."""
import json

import numpy as np
import pytest

from medjax.data import Record, default_config, select_records
from medjax.data import split_file
from medjax.errors import MedjaxError


def mri_config(path, **changes):
  c = default_config()
  c.phantoms.kind, c.phantoms.num = "mri", 120
  c.classes = (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
  c.split.mode, c.split.sizes, c.split.file = "sizes", (20, 10, 10), str(path)
  for key, value in changes.items():
    c[key] = value
  return c


def test_compute_is_patient_disjoint_with_many_images_per_patient():
  records = [Record(key=f"p{p:02d}/{i}", patient_id=f"p{p:02d}", kind="file",
                    class_index=(p + i) % 2) for p in range(30) for i in range(1 + p % 4)]
  c = default_config()
  for mode in ("random", "sizes"):
    c.split.mode, c.split.sizes = mode, (16, 8, 8)
    assigned = split_file.compute(records, c.split, ("a", "b"))
    by_split = {s: {r.patient_id for r in records if assigned.get(r.key) == s}
                for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])


def test_written_once_then_read_by_every_stage(tmp_path):
  path = tmp_path / "split.json"
  config = mri_config(path)
  splits = {s: select_records(config, s).records for s in ("train", "val", "test")}
  doc = json.loads(path.read_text())
  assert doc["counts"] == {"train": 20, "val": 10, "test": 10}
  written = {row["key"]: (row["split"], row["patient"]) for row in doc["records"]}
  for s, records in splits.items():
    assert {written[r.key] for r in records} == {(s, r.patient_id) for r in records}
  patients = [{r.patient_id for r in rs} for rs in splits.values()]
  assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
  # A later stage reads the file instead of splitting again: an edited file is what it gets.
  doc["records"] = [r for r in doc["records"] if r["split"] != "test"] + [
      {**r, "split": "test"} for r in doc["records"] if r["split"] == "test"][:5]
  path.write_text(json.dumps(doc))
  assert len(select_records(config, "test").records) == 5
  # One class, same images: a textual-inversion run for one token.
  one = mri_config(path, keep_classes=("diseased",))
  kept = select_records(one, "train").records
  assert kept and {r.key for r in kept} == {r.key for r in splits["train"]
                                            if r.class_index == 0}


def test_split_file_mismatches_are_one_line(tmp_path):
  path = tmp_path / "split.json"
  select_records(mri_config(path), "train")
  other = mri_config(path)
  other.split.sizes = (30, 10, 10)
  with pytest.raises(MedjaxError, match=r"split.json was made for the split settings"):
    select_records(other, "train")
  other = mri_config(path)
  other.phantoms.seed = 3
  with pytest.raises(MedjaxError, match=r"made for the dataset"):
    select_records(other, "train")
  with pytest.raises(MedjaxError, match=r"keep_classes=\('tumour',\)"):
    select_records(mri_config(path, keep_classes=("tumour",)), "train")
  path.write_text("{not json")
  with pytest.raises(MedjaxError, match="cannot read it as a medjax split file"):
    select_records(mri_config(path), "train")
  # Records that vanished from the dataset: an error, or a warning with on_bad_file='skip'.
  fresh = tmp_path / "fresh.json"
  select_records(mri_config(fresh), "train")
  doc = json.loads(fresh.read_text())
  doc["records"].append({"key": "phantom_mri/999999", "patient": "x", "split": "train",
                         "class": "healthy"})
  fresh.write_text(json.dumps(doc))
  with pytest.raises(MedjaxError, match="1 of its 41 records are not in the dataset"):
    select_records(mri_config(fresh), "train")
  assert select_records(mri_config(fresh, on_bad_file="skip"), "train").records


def test_records_file_round_trip(tmp_path):
  config = mri_config(tmp_path / "split.json")
  records = select_records(config, "train").records
  split_file.write_records(tmp_path, config, records, ("diseased", "healthy"))
  doc = split_file.read_records(tmp_path)
  assert doc["patients"] == len(records) and doc["split_file"] == config.split.file
  assert [r["key"] for r in doc["records"]] == [r.key for r in records]
  assert split_file.read_records(tmp_path / "nowhere") is None
  (tmp_path / "records.json").write_text("[]")
  with pytest.raises(MedjaxError, match="not a medjax records file"):
    split_file.read_records(tmp_path)
  assert np.all([r["class"] in ("diseased", "healthy") for r in doc["records"]])
