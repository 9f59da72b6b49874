"""`medjax.reproduce` on the embedded default, tiny: every stage on one split, then the table."""
import json

import pytest

from medjax import config_args
from medjax import reproduce
from medjax.errors import MedjaxError


def tiny(name: str, arg: str = ""):
  """configs/<name>.py with every stage shrunk to seconds (as --config.stages.X.config.Y would)."""
  c = config_args.load_config_file(f"configs/{name}.py" + (f":{arg}" if arg else ""))
  for stage in c.stages.values():
    s = stage.config
    if stage.kind == "train":
      s.total_steps, s.batch_size, s.progress_bar, s.checkpoint_every_steps = 1, 2, False, 1
      s.sample.num_per_prompt = 0
      s.prior.num_class_images, s.prior.num_inference_steps = 2, 2
    else:
      g = s.generation
      g.num_per_class, g.num_inference_steps, g.batch_size = 2, 2, 2
      s.classifier.num_steps = 2
      s.repeats, s.bootstrap, s.progress_bar = 1, 0, False
      s.fid.max_images = 4
      s.recon.num_images, s.recon.batch_size = 2, 2
  return c


@pytest.fixture(scope="module")
def paper_a_mri(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("paper_a_mri")
  config = tiny("paper_a_mri")
  return config, workdir, reproduce.reproduce(config, workdir)


def test_paper_a_table_on_one_split(paper_a_mri):
  config, workdir, results = paper_a_mri
  assert config.order == ("train_diseased", "train_healthy", "evaluate")
  assert [r[0] for r in results["rows"][1:4]] == ["real", "real+synthetic", "synthetic"]
  assert results["rows"][1][2] == "0.780 ± 0.017"  # the paper's number beside ours
  table = (workdir / "results.md").read_text()
  assert "| synthetic |" in table and "Stage evaluate" in table and "nan" not in table.lower()
  split = json.loads((workdir / "split.json").read_text())
  where = {row["key"]: row["split"] for row in split["records"]}
  for cls, token in (("diseased", "<cspca>"), ("healthy", "<healthy-prostate>")):
    records = json.loads((workdir / f"train_{cls}" / "records.json").read_text())["records"]
    assert records and {where[r["key"]] for r in records} == {"train"}
    assert {r["class"] for r in records} == {cls}  # one token per run, its class's images
    assert (workdir / f"train_{cls}" / "embeddings" / "diffusers" /
            f"{token.strip('<>')}.safetensors").exists()
  evaluation = json.loads((workdir / "evaluate" / "results.json").read_text())
  assert evaluation["splits"]["file"] == str(workdir / "split.json")
  test_patients = set(evaluation["splits"]["patients"]["test"])
  assert test_patients and not test_patients & set(evaluation["splits"]["patients"]["train"])
  assert [g["patients_in_eval_train"] for g in evaluation["generators"]] == [12, 12]
  assert evaluation["fid"]["reference"] == "generator's training images"


def test_finished_stages_are_skipped_and_changes_refused(paper_a_mri):
  config, workdir, _ = paper_a_mri
  again = reproduce.reproduce(config, workdir)
  assert again["skipped_done_stages"] == list(config.order)
  config.stages.evaluate.config.repeats = 3
  with pytest.raises(MedjaxError, match=r"evaluate finished with other settings \(repeats\)"):
    reproduce.reproduce(config, workdir)


def test_paper_b_table(tmp_path):
  config = tiny("paper_b")
  assert config.order[3:] == ("finetune_prior", "evaluate_finetune_prior")
  config.order = config.order[:3]  # CI time: the prior's stages are two more of the same kinds
  results = reproduce.reproduce(config, tmp_path)
  assert [r[0] for r in results["rows"][1:]] == ["evaluate_base", "evaluate_finetune"]
  generators = json.loads((tmp_path / "evaluate_finetune" / "results.json").read_text())
  assert generators["generators"][0]["workdir"] == str(tmp_path / "finetune")
  assert "VAE reconstruction SSIM" in (tmp_path / "results.md").read_text()


def test_bad_reproduce_configs(tmp_path):
  config = tiny("paper_a_mri")
  config.stages.evaluate.config.classifier.unlock()
  config.stages.evaluate.config.classifier.num_stepz = 2
  with pytest.raises(MedjaxError, match=r"num_stepz"):
    reproduce.reproduce(config, tmp_path)
  with pytest.raises(MedjaxError, match="ablation"):
    config_args.load_config_file("configs/paper_a_mri.py:ablation=colours")


def test_ablation_config_sweeps_the_tokens_runs():
  config = config_args.load_config_file("configs/paper_a_mri.py:paper,ablation=vectors")
  assert config.ablation.swept_values == (1, 8, 16, 64)
  assert config.ablation.evaluations == ("evaluate_1", "evaluate_8", "evaluate_16", "evaluate_64")
  assert config.stages.train_diseased_16.config.textual_inversion.num_vectors == 16
  assert config.stages.evaluate_16.embeddings == ("train_diseased_16", "train_healthy_16")
  small = config_args.load_config_file("configs/paper_a_mri.py:ablation=images")
  assert small.ablation.swept_values == (3, 6, 12) and "(10, 50, 100)" in " ".join(small.notes)
  reproduce.check_config(config)


@pytest.mark.slow
def test_ablation_gathers_one_table(tmp_path):
  results = reproduce.reproduce(tiny("paper_a_mri", "ablation=images"), tmp_path)
  assert [r[0] for r in results["rows"][1:]] == ["3", "6", "12"]
  assert (tmp_path / "ablation.png").exists() and (tmp_path / "ablation.md").exists()
  records = json.loads((tmp_path / "train_diseased_3" / "records.json").read_text())["records"]
  assert len(records) == 3
