"""Export to a diffusers directory: PyTorch loads it, weights are bit-identical, outputs match."""
import os

import numpy as np
import pytest

from medjax import StableDiffusion
from medjax import exporter
from medjax.convert import diffusers as diffusers_io
from medjax.convert.weights import read_safetensors
from medjax.errors import MedjaxError
from tests import tiny_diffusers


@pytest.fixture(scope="module")
def embedded():
  return StableDiffusion.embedded(seed=3)


def test_embedded_export_loads_in_diffusers(embedded, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import StableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  tiny_diffusers.torch_threads()
  error = exporter.export(embedded, tmp_path / "out")
  assert error == 0.0  # a reload computes exactly the same forward pass
  pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
  for name in ("unet", "vae", "text_encoder"):
    ours = diffusers_io.params_to_state_dict(embedded.params[name])
    theirs = tiny_diffusers.state_dict_numpy(getattr(pipe, name))
    if name == "text_encoder":  # transformers 5 names them without 'text_model.'
      theirs = diffusers_io.canonical_text_encoder_keys(theirs)
    assert ours.keys() == theirs.keys(), name
    for k in ours:
      np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  latents = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  emb = np.asarray(embedded.encode_prompt(["a chest x-ray"]))
  with torch.no_grad():
    ids = pipe.tokenizer(["a chest x-ray"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    np.testing.assert_allclose(pipe.text_encoder(ids).last_hidden_state.numpy(), emb, atol=1e-4)
    want = pipe.unet(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.tensor([10]),
                     torch.from_numpy(emb)).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(embedded.predict_noise(latents, [10], emb))
  assert tiny_diffusers.max_abs(got, want) <= 1e-4


def test_round_trip_of_a_diffusers_dir_is_bit_exact(tmp_path):
  tiny_diffusers.make_pipeline_dir(tmp_path / "src", style="sd2")
  sd = StableDiffusion.from_pretrained(tmp_path / "src")
  exporter.export(sd, tmp_path / "dst")
  mask = os.umask(0o022)
  os.umask(mask)
  assert (tmp_path / "dst").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
  for name, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                     ("text_encoder", "model")]:
    a = read_safetensors(tmp_path / "src" / name / f"{stem}.safetensors")
    b = read_safetensors(tmp_path / "dst" / name / f"{stem}.safetensors")
    if name == "text_encoder":  # transformers 5 drops 'text_model.'; we write the SD layout
      a = diffusers_io.canonical_text_encoder_keys(a)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


def test_refuses_existing_target_and_leaves_nothing_half_written(embedded, tmp_path, monkeypatch):
  (tmp_path / "taken").mkdir()
  with pytest.raises(MedjaxError, match="already exists"):
    exporter.export(embedded, tmp_path / "taken")

  def crash(*args, **kwargs):
    raise RuntimeError("disk full")
  monkeypatch.setattr(diffusers_io, "write_safetensors", crash)
  with pytest.raises(RuntimeError, match="disk full"):
    exporter.export(embedded, tmp_path / "new")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
