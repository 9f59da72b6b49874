"""Each evaluation protocol runs end to end on the embedded default (tiny sizes) and reports."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medjax.errors import MedjaxError
from medjax.eval import image_store
from medjax.eval import protocols

ROOT = Path(__file__).resolve().parents[2]


def load_config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny(config):
  """Smaller still than the configs' embedded defaults, for CI."""
  config.generation.num_per_class = 4
  config.generation.num_inference_steps = 4
  config.generation.batch_size = 4
  config.classifier.num_steps = 8
  config.fid.max_images = 8
  config.recon.num_images = 4
  config.bootstrap = 50
  config.progress_bar = False
  return config


@pytest.mark.parametrize("name", ["eval_paper_a_mri", "eval_paper_a_cxr", "eval_paper_b"])
@pytest.mark.parametrize("arg", ["", "paper"])
def test_configs_are_valid(name, arg):
  config = load_config(name, arg)
  from medjax.train_config import check_train_config  # pylint: disable=g-import-not-at-top
  check_train_config(config, protocols.base_config(),
                     free_maps=("data.prompt.class_prompts", "data.prompt.label_texts",
                                "generation.prompts"))
  assert config.protocol in protocols.PROTOCOLS
  if arg == "paper":
    assert config.fid.dims == 0 and not config.fid.random_weights
  # The privacy audit runs after generation: Inception features at paper scale, pixels (~3 s
  # on a CPU) on the embedded default.
  assert config.privacy.enabled
  assert config.privacy.features == ("inception" if arg == "paper" else "pixels")


# The MRI config and paper B run end to end in tests/test_reproduce.py (the same protocols as
# stages of a table, with these checks there too): each protocol runs once per CI run.
@pytest.mark.parametrize("name,positive,negative", [
    ("eval_paper_a_cxr", "pleural_effusion", "no_finding")])
def test_paper_a_protocol_writes_its_report(tmp_path, name, positive, negative):
  config = tiny(load_config(name))
  results = protocols.run_protocol(config, tmp_path)
  summary = results["summary_auc"]
  assert set(summary) == {"real", "real+synthetic", "synthetic"}
  for s in summary.values():
    assert 0 <= s["mean"] <= 1 and s["n"] == 2
  assert results["sizes"] == {"real_train": 24, "synthetic": 8, "val": 16, "test": 16}
  assert results["fid"]["all"] >= 0 and positive in results["fid"]
  assert any("random" in n for n in results["notes"])
  for out in ("results.json", "results.md", "roc.png", f"samples_{positive}.png",
              f"samples_{negative}.png", "config.json"):
    assert (tmp_path / out).exists(), out
  assert "nan" not in (tmp_path / "results.md").read_text().lower()
  assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "paper_a"
  assert "| classifier steps | 8 | ours |" in (tmp_path / "results.md").read_text()
  assert {r["setting"] for r in results["settings"]} >= {"repeats", "FID features"}
  check_privacy_section(tmp_path, results, "real train split", "phantom_cxr/", 24)


def check_privacy_section(workdir, results: dict, train_images: str, key_prefix: str,
                          num_train: int) -> None:
  """The privacy audit ran after generation (on by default): its results.json section (flagged
  pairs by record key, never a patient id), its results.md section, its PNGs, its settings."""
  p = json.loads((workdir / "results.json").read_text())["privacy"]
  assert p == json.loads(json.dumps(results["privacy"]))
  assert (p["train_images"], p["num_train"], p["heldout_split"]) == (train_images, num_train,
                                                                     "test")
  # Calibrated on the held-out images as the generator's VAE round-trips them: that store holds
  # each held-out image once, decoded (not the image itself).
  assert p["heldout_through_vae"] is True
  (vae_store,) = (workdir / "stores").glob("test_*px_vae")
  held = image_store.open_store(vae_store.with_name(vae_store.name[:-len("_vae")]))
  decoded = image_store.open_store(vae_store)
  assert len(decoded) == len(held) == p["num_heldout"] and decoded.keys == held.keys
  assert np.abs(decoded.floats(range(4)) - held.floats(range(4))).mean() > 0.01
  assert p["num_generated"] == results.get("sizes", {}).get("synthetic", p["num_generated"])
  assert p["flagged"] == len(p["flagged_pairs"]) == round(p["fraction_flagged"] *
                                                          p["num_generated"])
  assert 0 < p["false_positive_bound"] <= 1 and p["thresholds"]["percentile"] == 1.0
  for pair in p["flagged_pairs"]:
    assert set(pair) & {"patient", "patient_id"} == set() and pair["generated"].startswith(
        "generated/") and pair["train"].startswith(key_prefix), pair
  assert len(p["distances"]["generated"]) == p["num_generated"]
  for name in p["figures"].values():
    assert (workdir / name).exists(), name
  text = (workdir / "results.md").read_text()
  assert "## Privacy audit: near-copies of training images" in text
  assert f"| flagged generated images | {p['flagged']} (" in text
  assert "| privacy audit | on | ours | not stated |" in text
  assert "| privacy audit false-positive budget (%) | 1 | ours | not stated |" in text
  assert "| calibrated on | test split, through the generator's VAE |" in text
  # The audit's power: VAE round trips of the first training images, judged by the same rule.
  power = p["power"]
  assert 0 < power["num_probes"] <= min(100, num_train)
  assert power["flagged"] == round(power["fraction_flagged"] * power["num_probes"])
  assert ("| power: VAE round trips of training images flagged by the same rule | "
          f"{power['flagged']} / {power['num_probes']} (") in text
  assert "| privacy audit power probes (VAE round trips of training images) | 100 | ours |" in text
  assert len(list((workdir / "stores").glob("*_vae"))) == 2  # held-out and probes


def test_bad_protocol_inputs(tmp_path):
  config = load_config("eval_paper_a_mri")
  config.positive_class = "tumour"
  with pytest.raises(MedjaxError, match="positive_class='tumour'"):
    protocols.run_protocol(config, tmp_path)
  config = load_config("eval_paper_a_mri")
  config.protocol = "paper_c"
  with pytest.raises(MedjaxError, match="paper_c"):
    protocols.run_protocol(config, tmp_path)
  for bad in (-1, True):
    config = load_config("eval_paper_a_mri")
    config.privacy.power_probes = bad
    with pytest.raises(MedjaxError, match=rf"^config.privacy.power_probes={bad}: expected a count"):
      protocols.run_protocol(config, tmp_path / "power")
    assert not (tmp_path / "power").exists()
  config = load_config("eval_paper_a_mri", "paper")
  config.classifier.select = "best"  # with eval_every=0: 'best' would be the last step
  with pytest.raises(MedjaxError, match=r"^config.classifier: select='best' needs eval_every"):
    protocols.run_protocol(config, tmp_path / "best")
  assert not (tmp_path / "best").exists()  # refused before the workdir is made
  config = load_config("eval_paper_a_mri")
  config.settings = ("real", "imaginary")
  config.data.split.sizes = (2, 2, 2)
  with pytest.raises(MedjaxError, match="one class only|imaginary"):
    protocols.run_protocol(tiny(config), tmp_path)
