"""Bad input to sampling, FID weights and model loading (issue 15): one `error:` line naming the
file or flag, before anything is generated or written, never a traceback or a wrong result."""
import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medjax import StableDiffusion
from medjax import config_args
from medjax import sample_files
from medjax.convert.weights import read_safetensors
from medjax.convert.weights import write_safetensors
from medjax.errors import MedjaxError
from medjax.eval import inception_weights
from medjax.eval import protocols

ROOT = Path(__file__).resolve().parents[1]


def _sample_cli(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "medjax.sample", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _one_error_line(proc, message):
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"


# -- python -m medjax.sample ------------------------------------------------------------------


class _Tokenizer:
  def get_vocab(self):
    return {"a": 0, "<lung>": 1}


class _FakeModel:
  """What `sample_to_dir` reads of a model; `generate` returns grey 16x16 images."""
  name, vae_scale_factor = "fake", 8
  configs = {"unet": {"sample_size": 2}}
  tokenizer = _Tokenizer()

  def __init__(self):
    self.seeds = []

  def generate(self, prompts, negative_prompt, *, seed, **kwargs):
    del negative_prompt, kwargs
    self.seeds.append(list(seed))
    return np.full((len(prompts), 16, 16, 3), 0.5, np.float32)


def test_sample_grid_keeps_a_bounded_number_of_images(tmp_path, monkeypatch):
  monkeypatch.setattr(sample_files, "GRID_MAX", 3)
  real_grid, grid_sizes = sample_files.grid, []

  def grid(images):
    grid_sizes.append(len(images))
    return real_grid(images)
  monkeypatch.setattr(sample_files, "grid", grid)
  sd = _FakeModel()
  written = sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a <lung>", num_images=7,
                                       batch_size=2, steps=2, seed=5)
  assert grid_sizes == [3]  # the grid holds the first GRID_MAX images, not all of them
  assert sd.seeds == [[5, 6], [7, 8], [9, 10], [11]]
  assert len(written) == 8 and written[-1] == tmp_path / "out" / "grid.png"
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
  grid_png = Image.open(written[-1])
  assert grid_png.size == (32, 32)
  assert grid_png.text["grid"] == "the first 3 of 7 images" and grid_png.text["seed"] == "5..7"


def test_sample_refuses_a_run_that_cannot_fit_on_the_disk(tmp_path, monkeypatch):
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(sample_files.shutil, "disk_usage", lambda _: usage(10**9, 0, 10**6))
  sd = _FakeModel()
  with pytest.raises(MedjaxError, match=r"^--num_images = 100000000: 100000000 PNGs of 16x16 "
                     r"need at least ~19.2 GB, but .* has 0.001 GB free$"):
    sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a", num_images=10**8)
  assert sd.seeds == [] and not (tmp_path / "out").exists()


def test_sample_unknown_placeholder_token_is_refused(tmp_path):
  sd = _FakeModel()
  with pytest.raises(MedjaxError, match=r"--prompt: '<lungxray>' is not a token of fake; load "
                     r"its textual-inversion embedding with --embeddings=FILE"):
    sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a <lung>:0.5 AND a <lungxray>")
  with pytest.raises(MedjaxError, match="--negative_prompt: '<x>'"):
    sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a", negative_prompt="<x>")
  assert sd.seeds == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (dict(guidance=float("nan")), "--guidance = nan; expected a finite number >= 0"),
    (dict(guidance=float("inf")), "--guidance = inf; expected a finite number >= 0"),
    (dict(guidance=-1.0), "--guidance = -1.0; expected a finite number >= 0"),
    (dict(seed=-1), "--seed = -1; image i uses seed + i, so expected 0 <= seed and "
                    "seed + num_images - 1 <= 4294967295"),
    (dict(seed=2**32 - 2), "--seed = 4294967294; image i uses seed"),
    (dict(height=60), "--height = 60; expected 0 (default) or a positive multiple of 8"),
])
def test_sample_bad_flags(tmp_path, flags, message):
  args = dict(num_images=4, batch_size=4, steps=2, scheduler="ddim", height=0, width=0,
              outdir=tmp_path / "out", guidance=7.5, seed=0) | flags
  with pytest.raises(MedjaxError) as e:
    sample_files.check_args(**args)
  assert str(e.value).startswith(message)


def test_sample_outdir_that_cannot_be_a_folder(tmp_path):
  (tmp_path / "file").write_text("kept")
  with pytest.raises(MedjaxError, match=r"--outdir=.*/file/sub: .*/file is "
                     "a file"):
    sample_files.check_outdir(tmp_path / "file" / "sub")
  sample_files.check_outdir(tmp_path / "new" / "sub")  # creatable: fine, and nothing made
  assert not (tmp_path / "new").exists()


def test_sample_into_a_folder_of_earlier_images_needs_overwrite(tmp_path):
  sd = _FakeModel()
  first = sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a", num_images=2, steps=2)
  before = {p.name: p.read_bytes() for p in first}
  with pytest.raises(MedjaxError, match=r"--outdir=.*/out: already holds generated images "
                     r"\(sample_0000.png, ...\); pass --overwrite to replace them"):
    sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a", num_images=2, steps=2, seed=9)
  assert {p.name: p.read_bytes() for p in first} == before and len(sd.seeds) == 1
  sample_files.sample_to_dir(sd, tmp_path / "out", prompt="a", num_images=2, steps=2, seed=9,
                             overwrite=True)
  assert sd.seeds[-1] == [9, 10]


def test_sample_cli_outdir_is_a_file(tmp_path):
  out = tmp_path / "samples.png"
  out.write_text("an earlier file")
  proc = _sample_cli("--prompt=a chest x-ray", "--steps=2", f"--outdir={out}")
  _one_error_line(proc, f"--outdir={out}: exists and is not a directory")
  assert out.read_text() == "an earlier file"


def test_sample_cli_nan_guidance(tmp_path):
  proc = _sample_cli("--prompt=a chest x-ray", "--guidance=nan", f"--outdir={tmp_path / 'o'}")
  _one_error_line(proc, "--guidance = nan; expected a finite number >= 0")
  assert not (tmp_path / "o").exists()


def test_sample_cli_missing_embeddings_file(tmp_path):
  missing = tmp_path / "lung.safetensors"
  proc = _sample_cli("--prompt=a <lung>", f"--embeddings={missing}",
                     f"--outdir={tmp_path / 'o'}")
  _one_error_line(proc, f"--embeddings={missing}: no such file")
  assert not (tmp_path / "o").exists()


# -- FID weights ------------------------------------------------------------------------------


def _fid_config(weights=""):
  config = protocols.base_config()
  config.fid.weights = weights
  return config


def test_fid_named_missing_weights_is_an_error(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  missing = tmp_path / "missing.pth"
  with pytest.raises(MedjaxError, match=f"^{missing}: Inception weights file not found$"):
    protocols.inception_params(_fid_config(str(missing)))  # random_weights=True by default
  monkeypatch.setenv(inception_weights.ENV_VAR, str(missing))
  with pytest.raises(MedjaxError, match=f"{inception_weights.ENV_VAR}={missing}: file not found"):
    protocols.inception_params(_fid_config())


def test_fid_named_wrong_weights_is_an_error(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  wrong = tmp_path / "other.safetensors"
  write_safetensors({"conv.weight": np.zeros((2, 2), np.float32)}, wrong)
  with pytest.raises(MedjaxError, match=f"^{wrong}: not a pytorch-fid Inception state dict"):
    protocols.inception_params(_fid_config(str(wrong)))
  unreadable = tmp_path / "cut.safetensors"
  unreadable.write_bytes(b"\x01")
  with pytest.raises(MedjaxError, match=f"^{unreadable}: not a readable safetensors file"):
    protocols.inception_params(_fid_config(str(unreadable)))


def test_fid_random_fallback_only_when_no_weights_named(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  params, note = protocols.inception_params(_fid_config())
  assert "randomly initialised Inception" in note and "params" in params
  config = _fid_config()
  config.fid.random_weights = False
  with pytest.raises(MedjaxError, match="FID Inception weights not found"):
    protocols.inception_params(config)


def test_paper_a_bad_weights_fail_before_generating(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)

  def no_model(*args):
    raise AssertionError("the model loaded before the FID weights were checked")
  monkeypatch.setattr(protocols, "load_model", no_model)
  config = config_args.load_config_file(str(ROOT / "configs" / "eval_paper_a_cxr.py"))
  config.fid.weights = str(tmp_path / "missing.pth")
  with pytest.raises(MedjaxError, match="missing.pth: Inception weights file not found"):
    protocols.paper_a(config, tmp_path / "eval")
  assert not (tmp_path / "eval").exists()


# -- a diffusers directory with a fault -------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("faults") / "pipe"
  StableDiffusion.embedded().save_pretrained(path)
  return path


def _edit_json(name, **changes):
  def damage(path):
    data = json.loads((path / name).read_text())
    (path / name).write_text(json.dumps({**data, **changes}))
  return damage


def _write(name, data: bytes):
  return lambda path: (path / name).write_bytes(data)


def _sharded(weight_map):
  def damage(path):
    unet = path / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
  return damage


def _truncated_vocab(path):
  vocab = path / "tokenizer" / "vocab.json"
  vocab.write_text(vocab.read_text()[:50])


SAFETENSORS_HEADER = (8).to_bytes(8, "little")


# A fault of a diffusers directory -> (how to make it, the error it must give).
DAMAGES = {
    "vocab-truncated": (
        _truncated_vocab, r"tokenizer: cannot load the CLIP tokenizer \(JSONDecodeError"),
    "merges-missing": (
        lambda p: (p / "tokenizer" / "merges.txt").unlink(),
        r"tokenizer: not a CLIP tokenizer folder \(merges.txt is missing"),
    "model-max-length-str": (
        _edit_json("tokenizer/tokenizer_config.json", model_max_length="77"),
        r"tokenizer: tokenizer model_max_length = '77'; expected an integer in \[1, 77\]"),
    "scheduler-unknown-key": (
        _edit_json("scheduler/scheduler_config.json", bogus_key=3),
        r"scheduler/scheduler_config.json: scheduler config: unknown key 'bogus_key'; known: "),
    "scheduler-bad-value": (
        _edit_json("scheduler/scheduler_config.json", beta_start="x"),
        r"scheduler/scheduler_config.json: .*'beta_start' = 'x' is not supported"),
    "model-index-missing": (
        lambda p: (p / "model_index.json").unlink(), "no model_index.json"),
    "model-index-unet-class": (
        _edit_json("model_index.json", unet=["diffusers", "UNet3DConditionModel"]),
        r"model_index.json: 'unet' is UNet3DConditionModel, medjax supports "
        r"UNet2DConditionModel"),
    "model-index-tokenizer-class": (
        _edit_json("model_index.json", tokenizer=["transformers", "T5Tokenizer"]),
        r"model_index.json: 'tokenizer' is T5Tokenizer, medjax supports CLIPTokenizer"),
    "unet-zero-heads": (
        _edit_json("unet/config.json", attention_head_dim=0),
        r"unet/config.json: config key 'attention_head_dim' = 0 is not supported \(expected "
        r"an integer >= 1 or a list of them\)"),
    "unet-layers-str": (
        _edit_json("unet/config.json", layers_per_block="1"),
        r"unet/config.json: config key 'layers_per_block' = '1' is not supported"),
    "vae-zero-groups": (
        _edit_json("vae/config.json", norm_num_groups=0),
        r"vae/config.json: config key 'norm_num_groups' = 0"),
    "safetensors-header-list": (
        _write("unet/diffusion_pytorch_model.safetensors", SAFETENSORS_HEADER + b"[1,2,3] "),
        r"diffusion_pytorch_model.safetensors: not a safetensors file \(its header is not a "
        r"JSON object\)"),
    "safetensors-header-entry": (
        _write("unet/diffusion_pytorch_model.safetensors", SAFETENSORS_HEADER + b'{"a": 3}'),
        r"diffusion_pytorch_model.safetensors: not a safetensors file \(header entry 'a' = 3"),
    "index-weight-map-list": (
        _sharded(["shard.safetensors"]),
        r"diffusion_pytorch_model.safetensors.index.json: not a valid safetensors index "
        r"\(expected 'weight_map': \{tensor name: shard file name\}\)"),
    "index-weight-map-int": (
        _sharded({"conv_in.bias": 3}), r"index.json: not a valid safetensors index"),
}


@pytest.mark.parametrize("fault", DAMAGES)
def test_damaged_pipeline_dir(pipeline_dir, tmp_path, fault):
  damage, message = DAMAGES[fault]
  path = tmp_path / "pipe"
  shutil.copytree(pipeline_dir, path)
  damage(path)
  with pytest.raises(MedjaxError, match=message) as e:
    StableDiffusion.load(str(path))
  assert "\n" not in str(e.value)


def test_pretrained_is_a_weights_file(pipeline_dir):
  weights = pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
  with pytest.raises(MedjaxError, match="is a file; expected a diffusers pipeline directory"):
    StableDiffusion.load(str(weights))


def test_loading_writes_nothing_into_the_model_dir(pipeline_dir):
  """So a read-only cache (a hub snapshot, a shared mount) loads as well."""
  def listing():
    return sorted((str(p), p.stat().st_mtime_ns) for p in pipeline_dir.rglob("*"))
  before = listing()
  sd = StableDiffusion.load(str(pipeline_dir))
  assert listing() == before and sd.name == str(pipeline_dir)
  assert set(read_safetensors(pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors"))
