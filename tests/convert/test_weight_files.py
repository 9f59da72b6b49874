"""Weight files without a model: safetensors through the library, Flax msgpack, variants,
single-file metadata and sidecars, the one-line errors (issue 19)."""
import json

import flax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch

from medjax.convert import diffusers as diffusers_io
from medjax.convert import single_file
from medjax.convert import single_file_meta
from medjax.convert import sources
from medjax.convert import weights
from medjax.errors import MedjaxError


def test_safetensors_round_trip_through_the_library(tmp_path):
  a = np.arange(12, dtype=np.float32).reshape(3, 4)
  tensors = {"t": a.T, "bf16": a.astype(ml_dtypes.bfloat16), "f16": a.astype(np.float16),
             "f8": a.astype(ml_dtypes.float8_e4m3fn), "scalar": np.float32(2.5),
             "empty": np.zeros((0, 3), np.float32), "i64": np.arange(3)}
  path = tmp_path / "x.safetensors"
  weights.write_safetensors(tensors, path, metadata={"format": "pt", "n": 3})
  back = weights.read_safetensors(path)
  for name, want in tensors.items():
    want = np.asarray(want)
    assert back[name].dtype == want.dtype and back[name].shape == want.shape, name
    np.testing.assert_array_equal(back[name].astype(np.float32), want.astype(np.float32), name)
  assert weights.read_safetensors_metadata(path) == {"format": "pt", "n": "3"}
  # torch reads what medjax writes (the transposed view was written in its logical order)
  theirs = safetensors.torch.load_file(path)
  np.testing.assert_array_equal(theirs["t"].numpy(), a.T)
  assert str(theirs["bf16"].dtype) == "torch.bfloat16"


def test_safetensors_errors_are_one_line(tmp_path):
  path = tmp_path / "x.safetensors"
  weights.write_safetensors({"a": np.ones((64, 64), np.float32)}, path)
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(path.read_bytes()[:-10])
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  for bad, message in ((cut, "not a readable safetensors file, truncated or corrupt"),
                       (garbage, "not a readable safetensors file, truncated or corrupt"),
                       (tmp_path / "missing.safetensors", "cannot read")):
    with pytest.raises(MedjaxError, match=message) as e:
      weights.read_safetensors(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(MedjaxError, match="of dtype object"):
    weights.write_safetensors({"a": np.array([None])}, tmp_path / "o.safetensors")
  assert not (tmp_path / "o.safetensors").exists()


def test_flax_msgpack_reading(tmp_path):
  tree = {"conv_in": {"kernel": np.ones((3, 3, 4, 8), ml_dtypes.bfloat16),
                      "bias": np.zeros(8, np.float32)}}
  path = tmp_path / "diffusion_flax_model.msgpack"
  path.write_bytes(flax.serialization.to_bytes({"params": tree}))  # a wrapped tree unwraps
  flat = weights.read_flax_msgpack(path)
  assert flat[("conv_in", "kernel")].dtype == ml_dtypes.bfloat16
  sd = diffusers_io.flax_params_to_state_dict(flat, source=str(path))
  assert sd["conv_in.weight"].shape == (8, 4, 3, 3)  # HWIO -> OIHW
  for data, message in [(b"version https://git-lfs.github.com/spec/v1\n", "git-lfs pointer"),
                        (path.read_bytes()[:-20], "truncated or corrupt"),
                        (flax.serialization.to_bytes(3), "not a Flax params file")]:
    path.write_bytes(data)
    with pytest.raises(MedjaxError, match=message):
      weights.read_flax_msgpack(path)


def test_a_folder_of_one_variant_loads_it(tmp_path):
  stems = ("diffusion_pytorch_model",)
  weights.write_safetensors({"a": np.ones(2, np.float16)},
                            tmp_path / "diffusion_pytorch_model.fp16.safetensors")
  sd, source = weights.read_component_weights(tmp_path, stems)
  assert source.name == "diffusion_pytorch_model.fp16.safetensors" and sd["a"].dtype == np.float16
  weights.write_safetensors({"a": np.ones(2, np.float32)},
                            tmp_path / "diffusion_pytorch_model.ema.safetensors")
  with pytest.raises(MedjaxError, match="it has the variants ema, fp16: choose one"):
    weights.read_component_weights(tmp_path, stems)
  assert weights.read_component_weights(tmp_path, stems, variant="ema")[1].name.endswith(
      ".ema.safetensors")


def test_flax_pipeline_names_read_as_pytorch_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"_class_name": "FlaxUNet2DConditionModel", "use_memory_efficient_attention": False,
       "split_head_dim": False, "sample_size": 8}))
  assert diffusers_io.read_component_config(tmp_path / "config.json", "unet") == {
      "_class_name": "UNet2DConditionModel", "sample_size": 8}
  (tmp_path / "s.json").write_text(json.dumps({"_class_name": "FlaxPNDMScheduler",
                                               "dtype": "float32", "steps_offset": 1}))
  assert diffusers_io.read_scheduler_config(tmp_path / "s.json") == {
      "_class_name": "PNDMScheduler", "steps_offset": 1}


def test_single_file_sidecar_and_foreign_files(tmp_path):
  ckpt = tmp_path / "v2-768.safetensors"
  weights.write_safetensors({"conv_in.weight": np.zeros((1, 1))}, ckpt)
  assert single_file_meta.read(ckpt) == (None, None, None, None)
  ckpt.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
  assert single_file_meta.read(ckpt).prediction_type == "v_prediction"
  ckpt.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: x0\n")
  with pytest.raises(MedjaxError, match="parameterization 'x0'"):
    single_file_meta.read(ckpt)
  # one component of a diffusers folder, given where a pipeline or single file belongs
  with pytest.raises(MedjaxError, match="is a file; expected a diffusers pipeline directory or "
                                        "an SD single-file checkpoint"):
    single_file.load_single_file(ckpt)


def test_hf_id_forms():
  assert sources.parse_hf_id("runwayml/stable-diffusion-v1-5") == (
      "runwayml/stable-diffusion-v1-5", None, None)
  assert sources.parse_hf_id("CompVis/stable-diffusion-v1-4@flax") == (
      "CompVis/stable-diffusion-v1-4", "flax", None)
  assert sources.parse_hf_id("org/repo@main/sub/v1-5-pruned.safetensors") == (
      "org/repo", "main", "sub/v1-5-pruned.safetensors")
  for spec in ("./a/b", "/abs/path", "~/sd", "a", "../x/y", "org/repo/notes.txt", "a/../b"):
    assert sources.parse_hf_id(spec) is None, spec
