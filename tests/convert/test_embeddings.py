"""Textual-inversion embedding files (diffusers, AUTOMATIC1111): round trips and bad files.

Adding what they hold to a model (and parity with diffusers) is tested in
tests/test_pipeline_embeddings.py.
"""
import numpy as np
import pytest

from medjax.convert import embeddings as emb_lib
from medjax.convert.weights import write_safetensors
from medjax.errors import MedjaxError

TOKEN = "<med-lesion>"


def random_embedding(n, dim, seed=0):
  return (np.random.default_rng(seed).standard_normal((n, dim)) * 0.1).astype(np.float32)


# -- files ------------------------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path):
  emb = random_embedding(3, 32)
  path = emb_lib.write_diffusers_embeddings(tmp_path / "d", {TOKEN: emb})
  assert path.name == "learned_embeds.safetensors"
  for p in (path, path.parent):
    got = emb_lib.read_embeddings(p)
    assert list(got) == [TOKEN] and got[TOKEN].dtype == np.float32
    np.testing.assert_array_equal(got[TOKEN], emb)

  a = emb_lib.write_a1111_embeddings(tmp_path / "lesion.safetensors", "lesion", emb, step=7)
  np.testing.assert_array_equal(emb_lib.read_embeddings(a)["lesion"], emb)
  assert list(emb_lib.read_embeddings(a, token="<x>")) == ["<x>"]

  pt = emb_lib.write_a1111_embeddings(tmp_path / "lesion2.pt", "lesion2", emb[:1],
                                      allow_pickle=True)
  got = emb_lib.read_embeddings(pt, allow_pickle=True)
  np.testing.assert_array_equal(got["lesion2"], emb[:1])


def test_reads_single_vectors_and_bare_tensors(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  vec = random_embedding(1, 32)[0]
  write_safetensors({"<one>": vec}, tmp_path / "learned_embeds.safetensors")
  assert emb_lib.read_embeddings(tmp_path)["<one>"].shape == (1, 32)
  torch.save(torch.from_numpy(vec), tmp_path / "bare.bin")
  got = emb_lib.read_embeddings(tmp_path / "bare.bin", token="<b>", allow_pickle=True)
  np.testing.assert_array_equal(got["<b>"], vec[None])


def test_bad_files(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  emb = random_embedding(2, 32)
  torch.save({"<t>": torch.from_numpy(emb)}, tmp_path / "learned_embeds.bin")
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    emb_lib.read_embeddings(tmp_path / "learned_embeds.bin")
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    emb_lib.read_embeddings(tmp_path)  # the folder only has the .bin
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    emb_lib.write_a1111_embeddings(tmp_path / "x.pt", "x", emb)
  assert not (tmp_path / "x.pt").exists()
  with pytest.raises(MedjaxError, match="exactly one token"):
    emb_lib.write_diffusers_embeddings(tmp_path / "two", {"<a>": emb, "<b>": emb})
  write_safetensors({"clip_l": emb, "clip_g": emb}, tmp_path / "xl.safetensors")
  with pytest.raises(MedjaxError, match="SDXL"):
    emb_lib.read_embeddings(tmp_path / "xl.safetensors")
  (tmp_path / "empty").mkdir()
  with pytest.raises(MedjaxError, match="no textual-inversion file"):
    emb_lib.read_embeddings(tmp_path / "empty")
  with pytest.raises(MedjaxError, match="no such textual-inversion file"):
    emb_lib.read_embeddings(tmp_path / "missing.safetensors")
