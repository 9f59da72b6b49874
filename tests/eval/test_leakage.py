"""A generator trained on the evaluation's val/test patients is refused in one line."""
import json

import pytest

from medjax.data import default_config, select_records
from medjax.data import split_file
from medjax.errors import MedjaxError
from medjax.eval import leakage
from medjax.eval import protocols
from tests.eval.test_protocols import load_config


def eval_config(tmp_path):
  c = load_config("eval_paper_a_mri")
  c.data.split.file = str(tmp_path / "split.json")
  return c


def fake_generator(tmp_path, config, split: str, n: int, name: str = "gen"):
  """A training workdir's records.json holding n records of `split` (what train writes)."""
  workdir = tmp_path / name
  workdir.mkdir()
  records = select_records(config.data, split).records[:n]
  split_file.write_records(workdir, config.data, records, ("diseased", "healthy"))
  return workdir


def test_check_refuses_val_and_test_patients_only(tmp_path):
  config = eval_config(tmp_path)
  splits = {s: select_records(config.data, s).records for s in ("train", "val", "test")}
  ok = fake_generator(tmp_path, config, "train", 6, "ok")
  summary = leakage.check(config.data, splits, [(ok, split_file.read_records(ok))])
  assert summary[0]["patients_in_eval_train"] == 6 and summary[0]["same_dataset"]
  for split in ("val", "test"):
    bad = fake_generator(tmp_path, config, split, 2, f"bad_{split}")
    with pytest.raises(MedjaxError, match=rf"used 2 patient\(s\) of this evaluation's {split}"):
      leakage.check(config.data, splits, [(bad, split_file.read_records(bad))])
  other = default_config()  # another dataset: the same pseudonyms are other people
  other.phantoms.seed = 5
  doc = split_file.read_records(tmp_path / "bad_test")
  doc["dataset"] = split_file.dataset_id(other)
  assert not leakage.check(config.data, splits, [(tmp_path, doc)])[0]["same_dataset"]


def test_generator_workdirs_found_from_embedding_files(tmp_path):
  config = eval_config(tmp_path)
  workdir = fake_generator(tmp_path, config, "train", 2)
  (workdir / "embeddings" / "diffusers").mkdir(parents=True)
  config.model.embeddings = (str(workdir / "embeddings" / "diffusers" / "cspca.safetensors"),
                             str(tmp_path / "elsewhere.safetensors"))
  assert leakage.generator_workdirs(config.model) == [workdir]
  runs, notes = leakage.generator_records(config.model)
  assert len(runs) == 1 and not notes
  config.model.embeddings = (str(tmp_path / "elsewhere.safetensors"),)
  assert "not checked for leakage" in leakage.generator_records(config.model)[1][0]


def test_evaluation_refuses_a_leaky_generator_before_generating(tmp_path):
  config = eval_config(tmp_path)
  config.model.generator_workdirs = (str(fake_generator(tmp_path, config, "test", 3)),)
  with pytest.raises(MedjaxError, match="of this evaluation's test split"):
    protocols.run_protocol(config, tmp_path / "eval")
  assert not (tmp_path / "eval" / "results.json").exists()
  assert json.loads((tmp_path / "split.json").read_text())["counts"]["test"] == 16
