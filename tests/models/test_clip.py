"""Parity of medjax's CLIPTextModel with transformers' on tiny random models."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from medjax.convert.diffusers import (canonical_text_encoder_keys, params_to_state_dict,
                                      state_dict_to_params)
from medjax.convert.weights import read_component_weights
from medjax.errors import MedjaxError
from medjax import pipeline
from medjax.models import clip

VOCAB, EOS = 1000, 999
# Row 0 pads with EOS (SD1's pad token), row 1 with a low id (SD2 pads with '!').
IDS = np.array([[998, 5, 7, 321, EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS],
                [998, 17, 33, 600, 42, 8, EOS, 0, 0, 0, 0, 0]], np.int32)


def _torch_model(hidden_act, eos_token_id, seed=0):
  config = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
      bos_token_id=998, eos_token_id=eos_token_id, pad_token_id=1)
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(config).eval()
  with torch.no_grad():  # random LayerNorm/bias values too, so a swapped name shows up
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", EOS)],
                ids=["quick_gelu-eos2", "gelu-eos999"])
def loaded(request, tmp_path_factory):
  """A saved tiny transformers model, loaded back into medjax the way a pipeline does."""
  torch_model = _torch_model(*request.param)
  folder = tmp_path_factory.mktemp("clip")
  torch_model.save_pretrained(folder)
  state_dict, path = read_component_weights(folder, ("model",))
  model = clip.CLIPTextModel.from_config(torch_model.config.to_dict())
  params = state_dict_to_params(canonical_text_encoder_keys(state_dict),
                                pipeline.param_shapes(model), source=str(path))
  return torch_model, model, params


def _torch_outputs(torch_model):
  with torch.no_grad():
    out = torch_model(torch.tensor(IDS, dtype=torch.long))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_matches_transformers(loaded):
  torch_model, model, params = loaded
  want_hidden, want_pooled = _torch_outputs(torch_model)
  hidden, pooled = jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))
  # Measured on CPU: <= 6e-7 for both outputs and both activations.
  assert np.abs(np.asarray(hidden) - want_hidden).max() <= 1e-4
  assert np.abs(np.asarray(pooled) - want_pooled).max() <= 1e-4


def test_pooling_position_follows_eos_token_id(loaded):
  _, model, params = loaded
  hidden, pooled = jax.jit(model.apply)({"params": params}, jnp.asarray(IDS))
  # eos_token_id=2 (old configs) pools at the highest id, otherwise at the first EOS.
  pos = IDS.argmax(-1) if model.config["eos_token_id"] == 2 else (IDS == EOS).argmax(-1)
  np.testing.assert_array_equal(pooled, np.asarray(hidden)[np.arange(2), pos])


def test_state_dict_round_trip_is_bit_exact(loaded):
  torch_model, _, params = loaded
  want = canonical_text_encoder_keys({k: v.numpy() for k, v in torch_model.state_dict().items()})
  got = params_to_state_dict(params)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_bf16_compute_with_fp32_params(loaded):
  torch_model, model, params = loaded
  want_hidden, want_pooled = _torch_outputs(torch_model)
  bf16 = clip.CLIPTextModel.from_config(torch_model.config.to_dict(), dtype=jnp.bfloat16)
  assert pipeline.param_shapes(bf16)["text_model"]["final_layer_norm"]["scale"].dtype == jnp.float32
  hidden, pooled = jax.jit(bf16.apply)({"params": params}, jnp.asarray(IDS))
  assert hidden.dtype == jnp.bfloat16
  scale = np.abs(want_hidden).max()
  # Relative to the largest activation; measured 0.005-0.007 (bf16 has an 8-bit mantissa,
  # 2^-8 = 0.004 per rounding, accumulated over 3 layers).
  assert np.abs(np.asarray(hidden, np.float32) - want_hidden).max() / scale < 0.03
  assert np.abs(np.asarray(pooled, np.float32) - want_pooled).max() / scale < 0.03


def test_remat_gives_same_grads():
  config = {**clip.DEFAULT_CONFIG, "vocab_size": VOCAB, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 12}
  model, rematted = clip.CLIPTextModel(config), clip.CLIPTextModel(config, remat=True)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *model.dummy_inputs()))

  def grad(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, jnp.asarray(IDS))[0] ** 2)))(params)

  for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sd_hub_style_config_is_accepted():
  # The keys of stable-diffusion-2's text_encoder/config.json (transformers 4.25).
  config = {
      "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
      "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
      "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
      "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
      "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
      "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
      "projection_dim": 512, "torch_dtype": "float32", "transformers_version": "4.25.0.dev0",
      "vocab_size": 49408}
  model = clip.CLIPTextModel.from_config(config)
  assert model.config["num_hidden_layers"] == 23 and model.config["hidden_act"] == "gelu"


@pytest.mark.parametrize("key, value", [("rope_theta", 1e4), ("hidden_act", "relu"),
                                        ("attention_dropout", 0.1)])
def test_unsupported_config_names_the_key(key, value):
  with pytest.raises(MedjaxError, match=key):
    clip.CLIPTextModel.from_config({"hidden_size": 32, "num_attention_heads": 4, key: value},
                                   source="text_encoder/config.json")


def test_missing_weight_is_reported():
  model = clip.CLIPTextModel.from_config({"vocab_size": 10, "hidden_size": 8,
                                          "intermediate_size": 16, "num_hidden_layers": 1,
                                          "num_attention_heads": 2})
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *model.dummy_inputs()))
  state_dict = params_to_state_dict(params["params"])
  del state_dict["text_model.final_layer_norm.bias"]
  with pytest.raises(MedjaxError, match="final_layer_norm.bias"):
    state_dict_to_params(state_dict, pipeline.param_shapes(model), source="x.safetensors")

