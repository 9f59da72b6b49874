"""CLIP tokenizer folders written by medjax, checked against open_clip and transformers."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medjax import tokenizer as tokenizer_lib
from medjax.errors import MedjaxError

PROMPTS = ["a photo of a cat", "A chest X-ray with a small left pleural effusion.",
           "prostate MRI, T2-weighted: lesion 12 mm (PI-RADS 4)", "no finding  "]


def _open_clip_dir() -> Path:
  spec = importlib.util.find_spec("open_clip")
  if spec is None:
    pytest.skip("open_clip_torch is not installed")
  return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("clip_tokenizer")
  n = tokenizer_lib.write_clip_tokenizer_from_bpe(
      _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz", out)
  assert n == 49408
  return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny_tokenizer")
  tokenizer_lib.write_tiny_clip_tokenizer(out)
  return out


def _open_clip_simple_tokenizer():
  """open_clip's SimpleTokenizer, loaded by file path (importing open_clip pulls torchvision)."""
  spec = importlib.util.spec_from_file_location("_oc_tokenizer", _open_clip_dir() / "tokenizer.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def test_real_vocabulary_matches_open_clip(real_dir):
  tok = tokenizer_lib.load_tokenizer(real_dir)
  assert len(tok) == 49408
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
  ids = tokenizer_lib.tokenize(tok, PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # well-known ids
  want = _open_clip_simple_tokenizer()(PROMPTS).numpy()  # pads with 0
  for row, want_row in zip(ids, want):
    n = int(np.argmax(want_row == 49407)) + 1
    assert row[:n].tolist() == want_row[:n].tolist()
    assert (row[n:] == 49407).all()  # SD1 pads with EOS


def test_sd2_pads_with_exclamation_mark(tmp_path):
  tokenizer_lib.write_clip_tokenizer_from_bpe(
      _open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz", tmp_path, pad_token="!")
  tok = tokenizer_lib.load_tokenizer(tmp_path)
  ids = tokenizer_lib.tokenize(tok, "a photo of a cat")
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert (ids[0, 7:] == 0).all()  # '!' is token 0, as open_clip pads


def test_long_prompt_is_truncated_and_ends_with_eos(real_dir):
  tok = tokenizer_lib.load_tokenizer(real_dir)
  ids = tokenizer_lib.tokenize(tok, ["chest " * 100])
  assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_files_have_the_hub_layout(real_dir):
  vocab = json.loads((real_dir / "vocab.json").read_text())
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == 49407
  lines = (real_dir / "merges.txt").read_text().splitlines()
  assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
  config = json.loads((real_dir / "tokenizer_config.json").read_text())
  assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"


def test_tiny_tokenizer_round_trips_medical_prompts(tiny_dir):
  tok = tokenizer_lib.load_tokenizer(tiny_dir)
  assert len(tok) < 1000
  assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
  prompt = "a chest x-ray with pleural effusion"
  assert tok.tokenize(prompt) == ["a</w>", "chest</w>", "x</w>", "-</w>", "ray</w>", "with</w>",
                                  "pleural</w>", "effusion</w>"]
  ids = tokenizer_lib.tokenize(tok, [prompt, "zebra qx 42"])  # unseen words: smaller pieces
  assert ids.shape == (2, 77) and ids.max() < len(tok)
  # CLIP decodes every token as a word ('x - ray'); the ids survive the round trip.
  assert tok.decode(ids[0], skip_special_tokens=True) == "a chest x - ray with pleural effusion"
  texts = [tok.decode(row, skip_special_tokens=True) for row in ids]
  np.testing.assert_array_equal(tokenizer_lib.tokenize(tok, texts), ids)


def test_tiny_tokenizer_is_deterministic(tiny_dir, tmp_path):
  tokenizer_lib.write_tiny_clip_tokenizer(tmp_path)
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_missing_or_corrupt_folder_names_it(tmp_path, tiny_dir):
  with pytest.raises(MedjaxError, match="nowhere"):
    tokenizer_lib.load_tokenizer(tmp_path / "nowhere")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "vocab.json").write_text("{not json")
  (broken / "merges.txt").write_text((tiny_dir / "merges.txt").read_text())
  with pytest.raises(MedjaxError, match="broken"):
    tokenizer_lib.load_tokenizer(broken)


def test_bad_inputs(tmp_path):
  with pytest.raises(MedjaxError, match="pad_token"):
    tokenizer_lib.write_clip_tokenizer(tmp_path, [("a", "b")], pad_token="<pad>")
  with pytest.raises(MedjaxError, match="not a readable"):
    tokenizer_lib.write_clip_tokenizer_from_bpe(tmp_path / "missing.txt.gz", tmp_path)
