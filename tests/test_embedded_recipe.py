"""The embedded model: its shipped weights, and their recipe (configs/embedded_pretrain.py)."""
import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

from medjax import StableDiffusion
from medjax import batches
from medjax import config_args
from medjax import embedded
from medjax import embedded_recipe
from medjax import reproduce
from medjax.errors import MedjaxError
from tests.test_reproduce import tiny


def test_shipped_weights_load_with_their_provenance():
  sd = StableDiffusion.embedded()
  assert sd.name == embedded.PRETRAINED_NAME
  with safe_open(str(embedded.WEIGHTS), "np") as f:
    meta = f.metadata()
  assert meta[embedded.META_RECIPE].startswith(
      "python -m medjax.reproduce --config=configs/embedded_pretrain.py")
  assert len(meta[embedded.META_COMMIT].split("+")[0]) == 40
  figures = json.loads(meta[embedded.META_FIGURES])
  assert figures[0][-1] == "target" and len(figures) == 1 + len(embedded_recipe.TARGETS)
  # The random model is still there, and differs from the trained one.
  random = StableDiffusion.embedded(pretrained=False, seed=0)
  assert random.name == "embedded-tiny-seed0"
  a, b = sd.params["unet"]["conv_in"]["kernel"], random.params["unet"]["conv_in"]["kernel"]
  assert a.shape == b.shape and not np.allclose(a, b)
  assert sd.configs["vae"]["scaling_factor"] != embedded.TINY_VAE_CONFIG["scaling_factor"]


def test_missing_weights_name_the_file_and_the_way_out(tmp_path, monkeypatch):
  monkeypatch.setattr(embedded, "WEIGHTS", tmp_path / "gone.safetensors")
  with pytest.raises(MedjaxError, match="gone.safetensors.*embedded_random=True"):
    StableDiffusion.embedded()


def test_drop_prompts_is_seeded_and_resumes_alike():
  prompts = [f"p{i}" for i in range(2000)]
  a = batches.drop_prompts(prompts, 0.1, seed=0, step=5, shard=(0, 1))
  assert a == batches.drop_prompts(prompts, 0.1, seed=0, step=5, shard=(0, 1))
  assert a != batches.drop_prompts(prompts, 0.1, seed=0, step=6, shard=(0, 1))
  dropped = sum(p == "" for p in a)
  assert 150 < dropped < 250  # binomial(2000, 0.1): mean 200, std 13
  assert all(p in ("", q) for p, q in zip(a, prompts, strict=True))
  assert batches.drop_prompts(prompts, 0.0, seed=0, step=5, shard=(0, 1)) == prompts


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_uncond_prob_is_checked(value):
  config = tiny("embedded_pretrain").stages.unet.config
  config.unet.uncond_prob = value
  with pytest.raises(MedjaxError, match="config.unet.uncond_prob"):
    batches.uncond_setting(config)


def test_rows_compare_each_check_with_the_targets():
  good = {"vae_reconstruction": {"psnr": 30.0, "ssim": 0.9},
          "classifier_real_test": {"auc": 1.0},
          "classifier_on_generated": {"auc": 0.95, "accuracy": 0.9}}
  bad = {**good, "classifier_on_generated": {"auc": 0.85, "accuracy": 0.8}}
  table, met = embedded_recipe.rows({"check_cxr": good, "check_mri": good})
  assert met and table[0] == ["measure", "check_cxr", "check_mri", "target"]
  assert ["classifier AUC, generated", "0.950", "0.950", ">= 0.9"] in table
  assert not embedded_recipe.rows({"check_cxr": good, "check_mri": bad})[1]
  assert not embedded_recipe.rows({"check_cxr": {}})[1]  # a missing figure is not a pass


def test_a_stage_needs_stages_that_run_before_it():
  config = tiny("embedded_pretrain")
  config.order = ("vae", "unet", "vae_model", "model", "check_cxr", "check_mri")
  with pytest.raises(MedjaxError, match="stages.unet needs stage 'vae_model'"):
    reproduce.check_config(config)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("embedded_recipe")
  config = tiny("embedded_pretrain")
  config.data.phantoms.num = 40
  config.stages.vae_model.fit_scaling_factor = 8
  config.order = config.order[:-1]  # check_mri is check_cxr on other phantoms: CI time
  s = config.stages.check_cxr.config
  s.data.phantoms.num, s.data.split.sizes = 40, (8, 4, 8)
  s.privacy.enabled = False  # not a recipe target; the audit's own tests: eval/test_protocols
  return config, workdir, reproduce.reproduce(config, workdir)


def test_recipe_runs_every_stage_and_packages_the_model(recipe):
  config, workdir, results = recipe
  assert config.order == ("vae", "vae_model", "unet", "model", "check_cxr")
  # The VAE's latent scale is refitted: 1 / std of its latents on the train images.
  vae_dir = StableDiffusion.from_pretrained(workdir / "vae_model")
  assert vae_dir.scaling_factor != embedded.TINY_VAE_CONFIG["scaling_factor"]
  exported = json.loads((workdir / "vae_model" / "export.json").read_text())
  assert exported["fit_scaling_factor"] == 8 and exported["source_step"] == 1
  # The U-Net trains on that VAE (and its scale), the checks use the final model.
  unet = json.loads((workdir / "unet" / "config.json").read_text())
  assert unet["model"]["pretrained"] == str(workdir / "vae_model")
  assert unet["unet"]["train_text_encoder"] and unet["unet"]["uncond_prob"] == 0.1
  check = json.loads((workdir / "check_cxr" / "results.json").read_text())
  assert check["classifier_on_generated"]["auc"] is not None
  assert [g["workdir"] for g in check["generators"]] == [str(workdir / "vae"),
                                                           str(workdir / "unet")]
  # Fresh phantoms: not the generator's pool, so no patient is compared (and none leak).
  assert json.loads((workdir / "check_cxr" / "config.json").read_text())[
      "data"]["phantoms"]["seed"] == 0
  assert results["rows"][0] == ["measure", "check_cxr", "target"]
  assert "All targets met" in (workdir / "results.md").read_text()
  # The packaged single file is the exported model, with the recipe in its metadata.
  model = StableDiffusion.from_pretrained(workdir / "model")
  packed = StableDiffusion.from_single_file(results["weights"])
  assert packed.scaling_factor == model.scaling_factor == vae_dir.scaling_factor
  for part in ("unet", "vae", "text_encoder"):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(model.params[part])])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(packed.params[part])])
    np.testing.assert_array_equal(a, b)
  with safe_open(results["weights"], "np") as f:
    meta = f.metadata()
  assert json.loads(meta[embedded.META_FIGURES]) == results["rows"]


def test_recipe_skips_done_stages_and_refuses_a_changed_export(recipe):
  config, workdir, _ = recipe
  again = reproduce.reproduce(config, workdir)
  assert again["skipped_done_stages"] == list(config.order)
  config.stages.vae_model.fit_scaling_factor = 16
  with pytest.raises(MedjaxError, match="vae_model was exported with"):
    reproduce.reproduce(config, workdir)


@pytest.mark.slow
def test_rebuilding_the_shipped_weights_meets_the_same_figures(tmp_path):
  """The whole recipe (about 40 min on 2 CPU cores): every target met again, each figure near
  the shipped file's (XLA's CPU reductions may order sums differently on another machine)."""
  config = config_args.load_config_file("configs/embedded_pretrain.py")
  for name in ("vae", "unet"):
    config.stages[name].config.progress_bar = False
  results = reproduce.reproduce(config, tmp_path)
  assert results["targets_met"], results["rows"]
  with safe_open(str(embedded.WEIGHTS), "np") as f:
    shipped = json.loads(f.metadata()[embedded.META_FIGURES])
  assert [r[0] for r in results["rows"]] == [r[0] for r in shipped]
  for ours, theirs in zip(results["rows"][1:], shipped[1:], strict=True):
    for a, b in zip(ours[1:-1], theirs[1:-1], strict=True):
      assert abs(float(a) - float(b)) <= 0.05 * max(1.0, abs(float(b))), (ours, theirs)
