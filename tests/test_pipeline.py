"""StableDiffusion.from_pretrained + the public calls vs diffusers/transformers PyTorch (fp32).

Tolerance: 1e-4 max abs error on every output (measured on these tiny models: ~1e-6).
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import StableDiffusion
from medjax import pipeline
from medjax.errors import MedjaxError
from tests import tiny_diffusers

TOL = 1e-4
PROMPTS = ["a chest x-ray with pleural effusion", "no finding, a healthy prostate mri slice"]


@pytest.fixture(scope="module", params=tiny_diffusers.STYLES)
def loaded(request, tmp_path_factory):
  tiny_diffusers.torch_threads()
  path = tmp_path_factory.mktemp(request.param) / "pipe"
  pipe = tiny_diffusers.make_pipeline_dir(path, style=request.param)
  return pipe, StableDiffusion.from_pretrained(path), path


def test_encode_prompt_matches_transformers(loaded):
  import torch  # pylint: disable=g-import-not-at-top
  pipe, sd, _ = loaded
  ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
  np.testing.assert_array_equal(sd.tokenize(PROMPTS), ids.numpy())
  with torch.no_grad():
    want = pipe.text_encoder(ids).last_hidden_state.numpy()
  got = sd.encode_prompt(PROMPTS)
  assert got.shape == want.shape
  assert tiny_diffusers.max_abs(got, want) <= TOL


def test_predict_noise_matches_diffusers(loaded):
  import torch  # pylint: disable=g-import-not-at-top
  pipe, sd, _ = loaded
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  cross = pipe.unet.config.cross_attention_dim
  emb = rng.standard_normal((2, 77, cross)).astype(np.float32)
  t = np.array([999, 17])
  with torch.no_grad():
    want = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(t),
                     torch.from_numpy(emb)).sample.permute(0, 2, 3, 1).numpy()
  got = sd.predict_noise(latents, t, emb)
  assert tiny_diffusers.max_abs(got, want) <= TOL


def test_vae_round_trip_matches_diffusers(loaded):
  import torch  # pylint: disable=g-import-not-at-top
  pipe, sd, _ = loaded
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  sf = pipe.vae.config.scaling_factor
  with torch.no_grad():
    want = pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean * sf
    want_img = pipe.vae.decode(want / sf).sample.permute(0, 2, 3, 1).numpy()
    want = want.permute(0, 2, 3, 1).numpy()
  lat = sd.encode_images(images)
  assert lat.shape == (2, 8, 8, 4)
  assert tiny_diffusers.max_abs(lat, want) <= TOL
  assert tiny_diffusers.max_abs(sd.decode_latents(want), want_img) <= TOL


def test_params_tree_and_sampled_latents(loaded):
  _, sd, _ = loaded
  assert set(sd.params) == {"unet", "vae", "text_encoder"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(sd.params))
  images = np.zeros((1, 64, 64, 3), np.float32)
  a = sd.encode_images(images, key=jax.random.key(0))
  b = sd.encode_images(images, key=jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, sd.encode_images(images))


def test_logical_axes_cover_every_param(loaded):
  _, sd, _ = loaded
  specs = sd.logical_axes()
  n_specs = len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert n_specs == len(jax.tree.leaves(sd.params))


def test_bf16_compute_close_to_fp32(loaded):
  _, sd, path = loaded
  sd16 = StableDiffusion.from_pretrained(path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(sd16.params))
  rng = np.random.default_rng(2)
  latents = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  emb = sd.encode_prompt(PROMPTS[:1])
  want = np.asarray(sd.predict_noise(latents, [500], emb))
  got = np.asarray(sd16.predict_noise(latents, [500], emb), np.float32)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 3e-2, rel  # bf16 has an 8-bit mantissa; measured ~5e-3 here


# -- bad input -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad") / "pipe"
  tiny_diffusers.make_pipeline_dir(path, style="sd1")
  return path


def copy_of(src, tmp_path):
  dst = tmp_path / "copy"
  shutil.copytree(src, dst)
  shutil.copytree(src.with_name(src.name + "_tokenizer"), tmp_path / "copy_tokenizer")
  return dst


def test_missing_path(tmp_path):
  with pytest.raises(MedjaxError, match="does not exist"):
    StableDiffusion.from_pretrained(tmp_path / "nope")


def test_not_a_pipeline(tmp_path):
  with pytest.raises(MedjaxError, match="no model_index.json"):
    StableDiffusion.from_pretrained(tmp_path)


def test_unsupported_block_type(sd1_dir, tmp_path):
  path = copy_of(sd1_dir, tmp_path)
  cfg = json.loads((path / "unet/config.json").read_text())
  cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
  (path / "unet/config.json").write_text(json.dumps(cfg))
  with pytest.raises(MedjaxError, match="down_block_types"):
    StableDiffusion.from_pretrained(path)


def test_wrong_shape_and_missing_tensors(sd1_dir, tmp_path):
  from medjax.convert.weights import read_safetensors, write_safetensors  # pylint: disable=g-import-not-at-top
  path = copy_of(sd1_dir, tmp_path)
  f = path / "vae/diffusion_pytorch_model.safetensors"
  sd = dict(read_safetensors(f))
  del sd["decoder.conv_out.bias"]
  sd["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
  write_safetensors(sd, f)
  with pytest.raises(MedjaxError) as e:
    StableDiffusion.from_pretrained(path)
  msg = str(e.value)
  assert "diffusion_pytorch_model.safetensors" in msg
  assert "missing 1 (decoder.conv_out.bias)" in msg
  assert "encoder.conv_in.weight: got (16, 3, 5, 5), expected (16, 3, 3, 3)" in msg


def test_truncated_weights(sd1_dir, tmp_path):
  path = copy_of(sd1_dir, tmp_path)
  f = path / "unet/diffusion_pytorch_model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(MedjaxError, match="truncated or corrupt"):
    StableDiffusion.from_pretrained(path)


def test_bin_weights_read_with_weights_only(tmp_path):
  pipe = tiny_diffusers.make_pipeline_dir(tmp_path / "pipe", style="sd1", safe_serialization=False)
  assert (tmp_path / "pipe/unet/diffusion_pytorch_model.bin").is_file()
  sd = StableDiffusion.from_pretrained(tmp_path / "pipe")
  np.testing.assert_array_equal(
      sd.params["unet"]["conv_in"]["bias"], pipe.unet.conv_in.bias.detach().numpy())


def test_bin_without_torch_is_a_clear_error(sd1_dir, tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  path = copy_of(sd1_dir, tmp_path)
  (path / "vae/diffusion_pytorch_model.safetensors").unlink()
  (path / "vae/diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("no torch")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(MedjaxError, match=r"diffusion_pytorch_model.bin: .*needs torch"):
    StableDiffusion.from_pretrained(path)


def test_bad_inputs_to_calls(loaded):
  _, sd, _ = loaded
  with pytest.raises(MedjaxError, match="multiples of 8"):
    sd.encode_images(np.zeros((1, 60, 64, 3), np.float32))
  with pytest.raises(MedjaxError, match="NHWC"):
    sd.encode_images(np.zeros((1, 3, 64, 64), np.float32))
  with pytest.raises(MedjaxError, match="NHWC"):
    sd.predict_noise(np.zeros((1, 4, 8, 8), np.float32), [1], np.zeros((1, 77, 32)))


# -- single-file checkpoints (AUTOMATIC1111 / CompVis layout) --------------------------------

def test_from_single_file_matches_the_diffusers_dir(loaded, tmp_path):
  from medjax.convert import single_file  # pylint: disable=g-import-not-at-top
  pipe, sd, path = loaded
  state_dicts = {n: component_state_dict(path, n) for n in ("unet", "vae", "text_encoder")}
  configs = {n: dict(getattr(pipe, n).config) for n in ("unet", "vae")}
  configs["text_encoder"] = pipe.text_encoder.config.to_dict()
  single_file.save_single_file(tmp_path / "model.safetensors", state_dicts, configs)
  # What a single file cannot tell (head counts, group counts) is given, as a user would.
  overrides = {
      "unet": {k: configs["unet"][k] for k in ("attention_head_dim", "norm_num_groups",
                                               "upcast_attention", "sample_size")},
      "vae": {k: configs["vae"][k] for k in ("norm_num_groups", "sample_size")},
      "text_encoder": {"num_attention_heads": 4, "bos_token_id": 49406, "eos_token_id": 49407},
  }
  other = StableDiffusion.from_single_file(tmp_path / "model.safetensors",
                                           tokenizer=path / "tokenizer", configs=overrides)
  latents = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
  emb = sd.encode_prompt(PROMPTS[:1])
  assert tiny_diffusers.max_abs(other.encode_prompt(PROMPTS[:1]), emb) <= 1e-6
  assert tiny_diffusers.max_abs(other.predict_noise(latents, [3], emb),
                                sd.predict_noise(latents, [3], emb)) <= 1e-6
  assert tiny_diffusers.max_abs(other.decode_latents(latents), sd.decode_latents(latents)) <= 1e-6


def component_state_dict(path, name):
  from medjax.convert import diffusers as diffusers_io  # pylint: disable=g-import-not-at-top
  from medjax.convert.weights import read_component_weights  # pylint: disable=g-import-not-at-top
  sd, _ = read_component_weights(path / name, diffusers_io.COMPONENT_FILES[name][1])
  return diffusers_io.canonical_text_encoder_keys(sd) if name == "text_encoder" else sd


def test_single_file_pickle_needs_opt_in(tmp_path):
  (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
  with pytest.raises(MedjaxError, match="opt-in"):
    StableDiffusion.from_single_file(tmp_path / "model.ckpt")


def test_loading_and_random_init_compile_nothing(sd1_dir):
  """Weights reach the device in one device_put: `jnp.asarray` per leaf compiled a staging
  program for every distinct parameter shape (jax 0.10; 414 for a mid-size pipeline)."""
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event == (
      "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sd = StableDiffusion.from_pretrained(sd1_dir)
    params = pipeline.init_params(sd.unet, seed=1)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, f"{len(compiles)} XLA compiles while loading weights"
  assert isinstance(params["conv_in"]["kernel"], jax.Array)
  assert params["conv_in"]["kernel"].dtype == jnp.float32
