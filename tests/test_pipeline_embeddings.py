"""`StableDiffusion.load_embeddings` / `add_tokens` vs diffusers' `load_textual_inversion` (fp32).

Parity: the same prompt ids and text embeddings as diffusers after `maybe_convert_prompt`,
within 1e-4 max abs (measured on the tiny SD1 pipeline: ~1e-6).
"""
import copy

import numpy as np
import pytest

from medjax import StableDiffusion
from medjax import tokenizer as tokenizer_lib
from medjax.convert import embeddings as emb_lib
from medjax.errors import MedjaxError
from medjax.models import clip
from tests import tiny_diffusers

TOL = 1e-4
TOKEN = "<med-lesion>"
TOKENS = (TOKEN, "<a1111-nodule>", "<a1111-pt>")
PROMPTS = [f"a chest x-ray with {TOKEN} in the left lung, {TOKENS[1]}",
           f"{TOKENS[2]}, frontal view of {TOKEN}"]


def random_embedding(n, dim, seed=0):
  return (np.random.default_rng(seed).standard_normal((n, dim)) * 0.1).astype(np.float32)


# -- parity with diffusers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tiny_diffusers.torch_threads()
  path = tmp_path_factory.mktemp("sd1") / "pipe"
  pipe = tiny_diffusers.make_pipeline_dir(path, style="sd1")
  return pipe, StableDiffusion.from_pretrained(path)


def diffusers_prompt_embeds(pipe, prompts):
  import torch  # pylint: disable=g-import-not-at-top
  ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompts, pipe.tokenizer), padding="max_length",
                       max_length=77, truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return ids.numpy(), pipe.text_encoder(ids).last_hidden_state.numpy()


def test_matches_diffusers_load_textual_inversion(tiny, tmp_path):
  """One 3-vector token per format: diffusers, A1111 .safetensors, A1111 .pt (one compile)."""
  pipe, sd = tiny
  pipe = copy.deepcopy(pipe)  # load_textual_inversion mutates the pipeline
  dim = sd.configs["text_encoder"]["hidden_size"]
  embs = {t: random_embedding(3, dim, seed=i) for i, t in enumerate(TOKENS)}
  paths = [
      emb_lib.write_diffusers_embeddings(tmp_path / "d", {TOKENS[0]: embs[TOKENS[0]]}),
      emb_lib.write_a1111_embeddings(tmp_path / "lesion.safetensors", TOKENS[1], embs[TOKENS[1]],
                                     step=500),
      emb_lib.write_a1111_embeddings(tmp_path / f"{TOKENS[2]}.pt", TOKENS[2], embs[TOKENS[2]],
                                     step=500, allow_pickle=True),
  ]
  pipe.load_textual_inversion(paths[0])  # the token comes from the file
  pipe.load_textual_inversion(str(paths[1]), token=TOKENS[1])
  pipe.load_textual_inversion(str(paths[2]))  # diffusers takes the token from 'name'
  want_ids, want = diffusers_prompt_embeds(pipe, PROMPTS)

  loaded = sd.load_embeddings(paths, tokens=[None, TOKENS[1], None], allow_pickle=True)
  np.testing.assert_array_equal(loaded.tokenize(PROMPTS), want_ids)
  got = np.asarray(loaded.encode_prompt(PROMPTS))
  err = tiny_diffusers.max_abs(got, want)
  print(f"max abs error vs diffusers: {err:.2e}")
  assert err <= TOL, err
  assert loaded.configs["text_encoder"]["vocab_size"] == len(pipe.tokenizer) == 49408 + 9
  assert loaded.text_encoder.config["vocab_size"] == 49408 + 9
  # The original model is untouched.
  assert sd.configs["text_encoder"]["vocab_size"] == 49408
  assert TOKENS[0] not in sd.tokenizer.get_vocab()


# -- adding tokens (the embedded tiny model) ----------------------------------------------------

@pytest.fixture(scope="module")
def sd():
  return StableDiffusion.embedded(seed=0)


def test_add_tokens_expands_prompts_and_keeps_the_old_model(sd, tmp_path):
  emb = random_embedding(3, 32)
  before = np.asarray(sd.encode_prompt(["a chest x-ray"]))
  new = sd.load_embeddings({TOKEN: emb, "<one>": emb[:1]})
  ids = new.tokenize([f"a {TOKEN} and <one>"])[0]
  first = len(sd.tokenizer)
  np.testing.assert_array_equal(ids[1:7], [tokenizer_lib.tokenize(sd.tokenizer, "a")[0][1],
                                           first, first + 1, first + 2,
                                           tokenizer_lib.tokenize(sd.tokenizer, "and")[0][1],
                                           first + 3])
  table = np.asarray(clip.token_embedding_table(new.params["text_encoder"]))
  np.testing.assert_array_equal(table[first:first + 4], np.concatenate([emb, emb[:1]]))
  # vocab_size 1000 already has room for the new ids: the table keeps its shape.
  assert table.shape == (1000, 32)
  np.testing.assert_array_equal(np.asarray(new.encode_prompt(["a chest x-ray"])), before)
  np.testing.assert_array_equal(np.asarray(sd.encode_prompt(["a chest x-ray"])), before)
  assert TOKEN not in sd.tokenizer.get_vocab() and len(sd.tokenizer) == first
  # The saved tokenizer folder carries the tokens (save_pretrained copies it).
  assert TOKEN + "_2" in tokenizer_lib.load_tokenizer(new.tokenizer_dir).get_vocab()
  # Loading more tokens onto a loaded model keeps the expansion of the first ones.
  newer = new.load_embeddings({"<two>": emb[:2]})
  np.testing.assert_array_equal(newer.tokenize([TOKEN])[0][1:4], [first, first + 1, first + 2])
  assert newer.tokenize(["<two>"])[0][1:3].tolist() == [first + 4, first + 5]


def test_saved_model_with_multi_vector_tokens_expands_them_on_reload(sd, tmp_path):
  new = sd.load_embeddings({TOKEN: random_embedding(3, 32)})
  new.save_pretrained(tmp_path / "pipe")
  reloaded = StableDiffusion.from_pretrained(tmp_path / "pipe")
  assert isinstance(reloaded.tokenizer, tokenizer_lib.ExpandingTokenizer)
  prompt = [f"a chest x-ray with {TOKEN}"]
  np.testing.assert_array_equal(reloaded.tokenize(prompt), new.tokenize(prompt))
  assert not isinstance(sd.tokenizer, tokenizer_lib.ExpandingTokenizer)  # plain models stay plain


def test_add_tokens_errors(sd, tmp_path):
  with pytest.raises(MedjaxError, match="width 48.*32 wide"):
    sd.load_embeddings({TOKEN: random_embedding(2, 48)})
  wide = emb_lib.write_a1111_embeddings(tmp_path / "wide.safetensors", "wide",
                                        random_embedding(1, 1024))
  with pytest.raises(MedjaxError, match="wide.safetensors: embedding 'wide' has width 1024"):
    sd.load_embeddings(wide)
  with pytest.raises(MedjaxError, match="already in the tokenizer"):
    sd.load_embeddings({"<|endoftext|>": random_embedding(1, 32)})
  new = sd.load_embeddings({TOKEN: random_embedding(2, 32)})
  with pytest.raises(MedjaxError, match=f"'{TOKEN}' is already in the tokenizer"):
    new.load_embeddings({TOKEN: random_embedding(1, 32)})
  with pytest.raises(MedjaxError, match=f"'{TOKEN}_1' is already in the tokenizer"):
    new.load_embeddings({f"{TOKEN}_1": random_embedding(1, 32)})
  bad = random_embedding(1, 32)
  bad[0, 3] = np.nan
  with pytest.raises(MedjaxError, match="NaN"):
    sd.load_embeddings({"<nan>": bad})
  import torch  # pylint: disable=g-import-not-at-top
  pt = tmp_path / "xpt-token.pt"
  torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "ignored"}, pt)
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    sd.load_embeddings(pt)
  assert "xpt-token" in sd.load_embeddings(pt, allow_pickle=True).tokenizer.get_vocab()
  with pytest.raises(MedjaxError, match="2 files but 1 tokens"):
    sd.load_embeddings([pt, pt], tokens=["a"], allow_pickle=True)
  with pytest.raises(MedjaxError, match="is also in"):
    sd.load_embeddings([pt, pt], allow_pickle=True)
