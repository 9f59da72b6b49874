"""`medjax.reproduce` on the embedded default, tiny: every stage on one split, then the table."""
import json

import pytest

from medjax import config_args
from medjax import reproduce
from medjax.errors import MedjaxError
from tests.eval.test_protocols import check_privacy_section


def tiny(name: str, arg: str = ""):
  """configs/<name>.py with every stage shrunk to seconds (as --config.stages.X.config.Y would)."""
  c = config_args.load_config_file(f"configs/{name}.py" + (f":{arg}" if arg else ""))
  for stage in c.stages.values():
    s = stage.config
    if stage.kind == "train":
      s.total_steps, s.batch_size, s.progress_bar, s.checkpoint_every_steps = 1, 2, False, 1
      s.sample.num_per_prompt = 0
      s.prior.num_class_images, s.prior.num_inference_steps = 2, 2
    elif stage.kind == "evaluate":
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
  # The protocol's own report (the checks of tests/eval/test_protocols.py for the MRI config).
  assert evaluation["sizes"] == {"real_train": 24, "synthetic": 4, "val": 16, "test": 16}
  assert set(evaluation["summary_auc"]) == {"real", "real+synthetic", "synthetic"}
  assert all(0 <= s["mean"] <= 1 and s["n"] == 1 for s in evaluation["summary_auc"].values())
  assert evaluation["fid"]["all"] >= 0 and "diseased" in evaluation["fid"]
  assert any("random" in n for n in evaluation["notes"])
  for out in ("results.json", "results.md", "roc.png", "samples_diseased.png",
              "samples_healthy.png", "config.json"):
    assert (workdir / "evaluate" / out).exists(), out
  assert "| classifier steps | 2 | ours |" in (workdir / "evaluate" / "results.md").read_text()
  # The privacy audit against the images the two textual-inversion runs trained on (12 each).
  check_privacy_section(workdir / "evaluate", evaluation, "generator's training images",
                        "phantom_mri/", 24)
  assert results["privacy"]["evaluate"]["num_generated"] == 4
  assert results["privacy"]["evaluate"]["flagged"] == evaluation["privacy"]["flagged"]
  assert "## Privacy audit (ours" in table and "| evaluate | " in table
  calibration = evaluation["privacy"]["heldout_split"] + " split, through the generator's VAE"
  assert results["privacy"]["evaluate"]["calibrated_on"] == calibration
  assert f"| generator's training images | {calibration} |" in table


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
  # The protocol's own report (the checks tests/eval/test_protocols.py made for paper B).
  base = json.loads((tmp_path / "evaluate_base" / "results.json").read_text())
  recon = base["vae_reconstruction"]
  assert recon["num_images"] == 2 and recon["rmse"] > 0 and recon["fid"] >= 0
  by_resolution = base["vae_reconstruction_by_resolution"]
  assert list(by_resolution) == ["32", "64"]  # config.recon.resolutions of the embedded default
  assert by_resolution["64"] == recon and by_resolution["32"]["resolution"] == 32
  assert by_resolution["32"]["num_images"] == 2 and by_resolution["32"]["rmse"] > 0
  assert 0 <= base["classifier_on_generated"]["auc"] <= 1
  assert set(base["classifier_on_generated"]["per_class"]) == {"pleural_effusion", "no_finding"}
  table = (tmp_path / "evaluate_base" / "results.md").read_text()
  assert "| guidance scale | 7.5 | ours | not stated (RoentGen: 4) |" in table
  assert "VAE reconstruction SSIM (32 px)" in table and "nan" not in table.lower()
  assert "VAE reconstruction SSIM (64 px)" in table
  assert {p.name for p in (tmp_path / "evaluate_base" / "stores").iterdir()} == {
      "train_64px", "val_64px", "test_64px", "test_32px", "generated", "recon_32px",
      "recon_64px", "test_64px_vae", "train_64px_vae"}
  assert "VAE reconstruction SSIM" in (tmp_path / "results.md").read_text()
  # The base model's training images are unknown: audited against the real train split, noted.
  check_privacy_section(tmp_path / "evaluate_base", base, "real train split", "phantom_cxr/", 24)
  assert any(n.startswith("privacy audit: the generator's training images are unknown")
             for n in base["notes"])
  assert generators["privacy"]["train_images"] == "generator's training images"
  assert set(results["privacy"]) == {"evaluate_base", "evaluate_finetune"}


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
