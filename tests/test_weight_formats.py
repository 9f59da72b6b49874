"""Weights in every form a user has, through the one resolver every command uses (issue 19).

One tiny SD1-style diffusers pipeline is rewritten as: an AUTOMATIC1111 single file (medjax's
export, checked against diffusers' own `from_single_file`), a Hugging Face cache holding the
folder (`org/name`, `org/name@rev`) and the file (`org/name/file.safetensors`, and a repo of just
that file), and the old FlaxStableDiffusionPipeline layout (`tests/old_flax.py`). Every form
must give the very same params; `python -m medjax.sample` must make the same images from each.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax
import jax
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from medjax import StableDiffusion
from medjax import exporter
from medjax import trainer
from medjax.convert import sources
from medjax.errors import MedjaxError
from medjax.eval import protocols
from tests import old_flax
from tests import tiny_diffusers
from tests.train_support import tiny_config

ROOT = Path(__file__).resolve().parents[1]
REPO, SINGLE_REPO = "medjax-test/tiny-sd", "medjax-test/tiny-sd-single"


def _hf_snapshot(cache: Path, repo: str, commit: str, files: Path, ref: str = "main") -> None:
  """A Hugging Face hub cache entry as `hf download` leaves it: refs/<ref> -> snapshots/<commit>."""
  entry = cache / f"models--{repo.replace('/', '--')}"
  (entry / "refs").mkdir(parents=True, exist_ok=True)
  (entry / "refs" / ref).write_text(commit)
  target = entry / "snapshots" / commit
  if files.is_dir():
    shutil.copytree(files, target)
  else:
    target.mkdir(parents=True)
    shutil.copy(files, target / files.name)


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
  tiny_diffusers.torch_threads()
  root = tmp_path_factory.mktemp("forms")
  pipe = tiny_diffusers.make_pipeline_dir(root / "pipe", style="sd1")
  sd = StableDiffusion.load(str(root / "pipe"))
  error = exporter.export(sd, root / "model.safetensors", fmt="single_file",
                          source=str(root / "pipe"))
  cache = root / "hub"
  _hf_snapshot(cache, REPO, "a" * 40, root / "pipe")
  _hf_snapshot(cache, REPO, "b" * 40, root / "pipe", ref="v1")
  _hf_snapshot(cache, SINGLE_REPO, "c" * 40, root / "model.safetensors")
  trees = old_flax.write_flax_pipeline(root / "pipe", root / "flax")
  return dict(root=root, pipe=pipe, sd=sd, reload_error=error, cache=cache, trees=trees)


def _same_params(a: StableDiffusion, b: StableDiffusion, what: str, dtype=np.float32) -> None:
  """`b`'s params are exactly `a`'s (rounded to `dtype`, the file's)."""
  for name in ("unet", "vae", "text_encoder"):
    fa, fb = (flax.traverse_util.flatten_dict(x.params[name]) for x in (a, b))
    assert fa.keys() == fb.keys(), (what, name, sorted(set(fa) ^ set(fb))[:3])
    for k in fa:
      want = np.asarray(fa[k]).astype(dtype).astype(np.float32)
      np.testing.assert_array_equal(np.asarray(fb[k]), want,
                                    err_msg=f"{what}: {name}/{'/'.join(k)}")


def test_single_file_export_matches_diffusers_from_single_file(forms):
  """medjax writes an A1111 file; diffusers' `from_single_file` and medjax read it back."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  root, sd = forms["root"], forms["sd"]
  assert forms["reload_error"] == 0.0
  theirs = StableDiffusionPipeline.from_single_file(
      str(root / "model.safetensors"), config=str(root / "pipe"), local_files_only=True,
      safety_checker=None, requires_safety_checker=False)
  ours = StableDiffusion.load(str(root / "model.safetensors"))
  _same_params(sd, ours, "single file")  # exact: so `sd`'s outputs are `ours`'
  assert ours.configs == sd.configs and ours.scheduler_config == sd.scheduler_config
  latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  prompt = ["a chest x-ray with pleural effusion"]
  emb = np.array(sd.encode_prompt(prompt))
  with torch.no_grad():
    ids = theirs.tokenizer(prompt, padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), ours.tokenize(prompt))
    text = theirs.text_encoder(ids).last_hidden_state.numpy()
    eps = theirs.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.tensor([10]),
                      torch.from_numpy(emb)).sample.permute(0, 2, 3, 1).numpy()
  assert tiny_diffusers.max_abs(text, emb) <= 1e-4
  assert tiny_diffusers.max_abs(eps, sd.predict_noise(latents, [10], emb)) <= 1e-4


def test_resolver_forms_and_errors(forms, monkeypatch):
  root, cache = forms["root"], forms["cache"]
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  snap = cache / "models--medjax-test--tiny-sd" / "snapshots"
  cases = {
      str(root / "pipe"): (sources.DIFFUSERS, root / "pipe"),
      str(root / "model.safetensors"): (sources.SINGLE_FILE, root / "model.safetensors"),
      REPO: (sources.DIFFUSERS, snap / ("a" * 40)),
      f"{REPO}@v1": (sources.DIFFUSERS, snap / ("b" * 40)),
      SINGLE_REPO: (sources.SINGLE_FILE, None),
      f"{SINGLE_REPO}/model.safetensors": (sources.SINGLE_FILE, None),
  }
  for spec, (kind, path) in cases.items():
    found = sources.resolve(spec)
    assert (found.kind, found.name) == (kind, spec), spec
    assert path is None or found.path == path, spec
    assert found.path.exists()
  for spec, message in {
      "nobody/nothing": (f"nobody/nothing: no such local path, and nobody/nothing is not in "
                         f"the local Hugging Face cache ({cache}); medjax never downloads"),
      f"{REPO}@v9": f"{REPO}@v9 is not in the local Hugging Face cache",
      f"{REPO}/missing.safetensors": f"missing.safetensors of {REPO} is not in the local",
      str(root / "nope"): "nope: no such file or directory (expected a diffusers directory, a "
                          "single-file checkpoint, or a Hugging Face id org/name)",
  }.items():
    with pytest.raises(MedjaxError) as e:
      sources.resolve(spec)
    assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))


def test_old_flax_weights_load_as_the_pytorch_ones(forms, tmp_path):
  trees = forms["trees"]
  # The names of diffusers' and transformers' Flax modules (see tests/old_flax.py).
  for name, path in [
      ("unet", ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q",
                "kernel")),
      ("unet", ("down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj",
                "kernel")),
      ("unet", ("up_blocks_1", "attentions_0", "transformer_blocks_0", "attn2", "to_out_0",
                "bias")),
      ("unet", ("time_embedding", "linear_1", "kernel")), ("unet", ("conv_norm_out", "scale")),
      ("vae", ("encoder", "mid_block", "attentions_0", "query", "kernel")),
      ("vae", ("decoder", "up_blocks_0", "upsamplers_0", "conv", "kernel")),
      ("text_encoder", ("text_model", "encoder", "layers", "0", "self_attn", "q_proj", "kernel")),
      ("text_encoder", ("text_model", "embeddings", "token_embedding", "embedding"))]:
    assert path in flax.traverse_util.flatten_dict(trees[name]), (name, path)
  flax_sd = StableDiffusion.load(str(forms["root"] / "flax"))
  _same_params(forms["sd"], flax_sd, "flax msgpack")
  # the `bf16` branch's weights: bf16 in the file, fp32 params holding exactly those values
  bf16 = old_flax.write_flax_pipeline(forms["root"] / "pipe", tmp_path / "bf16",
                                      dtype=ml_dtypes.bfloat16)
  assert jax.tree.leaves(bf16)[0].dtype == ml_dtypes.bfloat16
  _same_params(forms["sd"], StableDiffusion.load(str(tmp_path / "bf16")), "bf16",
               dtype=ml_dtypes.bfloat16)
  truncated = tmp_path / "bf16" / "unet" / "diffusion_flax_model.msgpack"
  truncated.write_bytes(truncated.read_bytes()[:-50])
  with pytest.raises(MedjaxError, match="diffusion_flax_model.msgpack: not a readable Flax "
                                        "msgpack file, truncated or corrupt"):
    StableDiffusion.load(str(tmp_path / "bf16"))


def test_train_evaluate_and_export_take_every_form(forms, monkeypatch):
  """The model builders of train, evaluate and export go through the same resolver."""
  monkeypatch.setenv("HF_HUB_CACHE", str(forms["cache"]))
  spec = str(forms["root"] / "model.safetensors")
  sd, _ = trainer.build_model(tiny_config("unet", **{"model.pretrained": spec}))
  _same_params(forms["sd"], sd, f"train: {spec}")
  config = protocols.base_config()
  config.model.pretrained = f"{SINGLE_REPO}/model.safetensors"
  sd = protocols.load_model(config)
  assert sd.name == config.model.pretrained
  _same_params(forms["sd"], sd, "evaluate")
  sd = exporter.load_source(f"{REPO}@v1")
  assert sd.name == f"{REPO}@v1"
  _same_params(forms["sd"], sd, "export")


DRIVER = """
import json, sys
from absl import flags
from medjax import cli, sample
sample.define_flags()
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["sample", *argv])
  with cli.one_line_errors():
    sample.main([])
"""


def test_sample_cli_takes_every_form(forms, tmp_path):
  """`medjax.sample`'s main, once per form in one process (one compile), then a missing id as
  `python -m medjax.sample` prints it."""
  root = forms["root"]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(forms["cache"])}
  specs = [str(root / "pipe"), str(root / "model.safetensors"), REPO, str(root / "flax")]
  runs = [[f"--pretrained={spec}", "--prompt=a chest x-ray", "--num_images=1",
           "--batch_size=1", "--steps=2", "--seed=3", f"--outdir={tmp_path / str(i)}"]
          for i, spec in enumerate(specs)]
  proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  images = []
  for i, spec in enumerate(specs):
    png = Image.open(tmp_path / str(i) / "sample_0000.png")
    assert png.text["model"] == spec and png.text["synthetic"] == "true"
    images.append(np.asarray(png, np.int16))
  for spec, image in zip(specs[1:], images[1:], strict=True):
    assert np.abs(image - images[0]).max() == 0, spec  # the same params: the same pixels

  proc = subprocess.run([sys.executable, "-m", "medjax.sample", "--pretrained=nobody/nothing",
                         "--prompt=x", f"--outdir={tmp_path / 'none'}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: nobody/nothing: no such local path, and nobody/nothing is not in the local "
      f"Hugging Face cache ({forms['cache']})")
  assert not (tmp_path / "none").exists()
