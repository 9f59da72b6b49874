"""Every setting of a paper protocol's report says where it comes from (medjax.eval.provenance)."""
import json
from pathlib import Path

import pytest

from medjax import config_args
from medjax import train_config
from medjax.data import make_dataset
from medjax.errors import MedjaxError
from medjax.eval import protocols
from medjax.eval import provenance

ROOT = Path(__file__).resolve().parents[2]


def rows(name: str, arg: str = "", **changes) -> dict:
  config = config_args.load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")
  for key, value in changes.items():
    node, *path = key.split(".")
    target = config[node] if path else config
    target[path[0] if path else node] = value
  return {r["setting"]: r for r in provenance.settings(config)}


def test_paper_b_borrows_its_classifier_from_a_and_its_sampling_from_roentgen():
  r = rows("eval_paper_b", "paper")
  for s in ("classifier learning rate", "classifier steps", "classifier batch size"):
    assert r[s]["source"] == "borrowed from paper A", s
  assert r["classifier steps"]["paper_value"] == "not stated (paper A: 6,250)"
  for s, value in (("sampler", "pndm"), ("sampling steps", 75), ("guidance scale", 4.0)):
    assert (r[s]["value"], r[s]["source"]) == (value, provenance.BORROWED_ROENTGEN), s
  assert r["classifier"]["source"] == "paper B" and r["resolution"]["source"] == "paper B"
  assert r["split sizes (train / val / test)"]["source"] == "ours"  # paper B states none
  small = rows("eval_paper_b")  # the embedded default: every reduction is ours, theirs shown
  assert (small["guidance scale"]["source"], small["guidance scale"]["paper_value"]) == (
      "ours", "not stated (RoentGen: 4)")
  assert r["VAE table resolutions"]["shown"] == "256 / 512 / 768"  # the issue's, not the paper's


def test_paper_a_states_the_prostate_protocol_and_lends_it_to_cxr():
  mri, cxr, small = rows("eval_paper_a_mri", "paper"), rows("eval_paper_a_cxr", "paper"), \
      rows("eval_paper_a_mri")
  for s in ("split sizes (train / val / test)", "classifier steps", "repeats",
            "classifier input size", "synthetic images"):
    assert mri[s]["source"] == "paper A" and cxr[s]["source"] == "borrowed from paper A", s
    assert small[s]["source"] == "ours" and small[s]["paper_value"] == mri[s]["paper_value"], s
  assert mri["split sizes (train / val / test)"]["shown"] == "200 / 200 / 200"
  assert (small["classifier steps"]["shown"], small["classifier steps"]["paper_value"]) == (
      "30", "6,250")
  assert mri["FID features"]["source"] == "paper A" and small["FID features"]["value"] == 64
  assert mri["sampler"]["paper_value"] == "not stated"
  # An override away from the paper's value is ours, whatever the config file says.
  assert rows("eval_paper_a_mri", "paper", **{"classifier.learning_rate": 3e-4})[
      "classifier learning rate"]["source"] == "ours"
  given = rows("eval_paper_a_mri", "paper", **{"model.pretrained": "/w/sd2"})["base model"]
  assert (given["value"], given["source"], given["paper_value"]) == (
      "/w/sd2", "given", "SD 2.0 512-base-ema")


def test_the_privacy_audit_is_ours():
  """Neither paper audits its generated images: the audit, its features and its budget are
  ours wherever they run (on at paper scale and on the embedded default)."""
  for name, arg, features in (("eval_paper_a_mri", "paper", "inception"),
                              ("eval_paper_b", "", "pixels"), ("eval_privacy", "", "inception")):
    r = rows(name, arg)
    assert [(r[s]["shown"], r[s]["source"], r[s]["paper_value"]) for s in (
        "privacy audit", "privacy audit features", "privacy audit false-positive budget (%)")
            ] == [("on", "ours", "not stated"), (features, "ours", "not stated"),
                  ("1", "ours", "not stated")], name
  off = rows("eval_paper_a_cxr", "", **{"privacy.enabled": False})
  assert off["privacy audit"]["shown"] == "off" and "privacy audit features" not in off
  assert rows("eval_privacy", "", **{"privacy.enabled": False})["privacy audit"]["shown"] == "on"


def test_vae_resolutions_are_listed_when_the_config_has_them():
  config = config_args.load_config_file(f"{ROOT / 'configs' / 'eval_paper_b'}.py:paper")
  config.recon.resolutions = (256, 512)
  r = {x["setting"]: x for x in provenance.settings(config)}
  assert r["VAE table resolutions"]["shown"] == "256 / 512"
  assert r["VAE table resolutions"]["source"] == "ours"


def test_training_settings_of_paper_configs():
  a = rows("cxr_ti", "paper")
  assert [a[s]["source"] for s in ("steps", "vectors per token", "images per class")] == [
      "paper A"] * 3
  assert a["steps"]["value"] == 50_000 and rows("mri_ti", "paper")["steps"]["value"] == 100_000
  assert a["learning rate"]["source"] == "ours" and a["base model"]["paper_value"] == (
      "SD 2.0 512-base-ema")
  eight = rows("cxr_ti", "paper,vectors=8")["vectors per token"]
  assert (eight["source"], eight["paper_value"]) == ("ours", "64")
  b = rows("cxr_ti_lungxray", "paper")
  assert {b[s]["source"] for s in ("steps", "learning rate", "vectors per token",
                                   "images per class")} == {"ours"}
  assert b["base model"]["paper_value"] == "SD 1.4" and b["resolution"]["source"] == "paper B"
  assert rows("cxr_unet", "paper")["base model"]["paper_value"] == "SD 1.4"
  plain = config_args.load_config_file(f"{ROOT}/configs/cxr_ti.py")
  assert not provenance.settings(plain) and provenance.train_summary(plain) == {}


def test_reports_carry_a_settings_table(tmp_path):
  config = config_args.load_config_file(f"{ROOT / 'configs' / 'eval_paper_b'}.py:paper")
  results = {"protocol": "paper_b", "notes": []}
  protocols.write_report(tmp_path, results, [["measure", "value"], ["x", "1"]], "T", config)
  text = (tmp_path / "results.md").read_text()
  assert "| x | 1 |\n\n## Settings\n\n| setting | value | source | paper's value |\n" in text
  assert ("| guidance scale | 4 | borrowed from RoentGen (paper B follow-up) | not stated "
          "(RoentGen: 4) |") in text
  saved = json.loads((tmp_path / "results.json").read_text())["settings"]
  assert saved == json.loads(json.dumps(results["settings"])) and len(saved) == text.count(
      "\n| ") - 3  # all lines but the two tables' headers and the row x


def test_lungxray_learns_one_token_from_a_few_images():
  config = config_args.load_config_file(f"{ROOT}/configs/cxr_ti_lungxray.py")
  assert config.textual_inversion.tokens == (("<lungxray>", "chest x-ray"),)
  data = make_dataset(config.data, "train", 8, seed=0, resolution=config.resolution,
                      num_epochs=1, shuffle=False, drop_remainder=False)
  prompts = [p for batch in data for p in batch["prompt"]]
  assert prompts == ["a photo of a <lungxray>"] * 5


def test_a_train_config_names_a_known_protocol():
  config = config_args.load_config_file(f"{ROOT}/configs/cxr_ti.py")
  config.protocol = "paper_c"
  with pytest.raises(MedjaxError, match=r"^config.protocol='paper_c': expected '', 'paper_a' or "
                     "'paper_b'$"):
    train_config.check_train_config(config)
