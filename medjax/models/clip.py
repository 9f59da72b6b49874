"""CLIP text encoder matching transformers' `CLIPTextModel` (SD1 CLIP-L, SD2 OpenCLIP-H).

Submodules are named like transformers' (`text_model.encoder.layers_0.self_attn.q_proj`, ...),
so `medjax.convert.diffusers` maps weights 1:1. SD2's OpenCLIP ViT-H text tower, converted to
CLIP layout by diffusers, is the same module with `hidden_act='gelu'` and 23 layers.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxError
from medjax.models import attention as attention_lib
from medjax.models import layers
from medjax.validation import ANY
from medjax.validation import check_config
from medjax.validation import int_at_least
from medjax.validation import is_int
from medjax.validation import positive_number

Dtype = Any

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' 'gelu' is the erf form
}


_POSITIVE_INT = int_at_least(1)
_NO_DROPOUT = (0, 0.0, None)  # medjax has no dropout

# Keys that change the forward pass, each checked.
_ARCH_KEYS = {
    "vocab_size": _POSITIVE_INT, "hidden_size": _POSITIVE_INT,
    "intermediate_size": _POSITIVE_INT, "num_hidden_layers": _POSITIVE_INT,
    "num_attention_heads": _POSITIVE_INT, "max_position_embeddings": _POSITIVE_INT,
    "hidden_act": tuple(_ACTIVATIONS), "layer_norm_eps": positive_number,
    "eos_token_id": is_int, "attention_dropout": _NO_DROPOUT, "dropout": _NO_DROPOUT,
    "pruned_heads": lambda v: not v, "model_type": ("clip_text_model",),
}
# Keys transformers writes into config.json that do not affect this module's forward pass
# (init, generation and bookkeeping fields, also those older transformers wrote in full).
_INERT_KEYS = (
    "architectures", "projection_dim", "bos_token_id", "pad_token_id", "initializer_range",
    "initializer_factor", "dtype", "torch_dtype", "transformers_version", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_word_embeddings", "tokenizer_class", "prefix",
    "task_specific_params", "finetuning_task", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
    "begin_suppress_tokens", "suppress_tokens", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_scores", "remove_invalid_values", "repetition_penalty", "return_dict_in_generate",
    "temperature", "top_k", "top_p", "typical_p",
)
SUPPORTED_CONFIG = {**_ARCH_KEYS, **{k: ANY for k in _INERT_KEYS}}


class CLIPAttention(nn.Module):
  num_heads: int
  hidden_size: int
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = lambda name, axes: layers.dense(self.hidden_size, name, axes, dtype=self.dtype,
                                           param_dtype=self.param_dtype)
    q = proj("q_proj", (layers.EMBED, layers.HEADS))(x)
    k = proj("k_proj", (layers.EMBED, layers.HEADS))(x)
    v = proj("v_proj", (layers.EMBED, layers.HEADS))(x)
    out = attention_lib.attention(q, k, v, num_heads=self.num_heads, is_causal=True,
                           implementation=self.attention)
    return proj("out_proj", (layers.HEADS, layers.EMBED))(out)


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.intermediate_size, "fc1", (layers.EMBED, layers.MLP), dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    x = _ACTIVATIONS[self.hidden_act](x)
    return layers.dense(self.hidden_size, "fc2", (layers.MLP, layers.EMBED), dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  layer_norm_eps: float
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(self.layer_norm_eps, "layer_norm1", **kw)(x)
    x = x + CLIPAttention(self.num_heads, self.hidden_size, self.attention, name="self_attn",
                          **kw)(h)
    h = layers.layer_norm(self.layer_norm_eps, "layer_norm2", **kw)(x)
    return x + CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, name="mlp",
                       **kw)(h)


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_embeds=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    table = layers.embed(self.vocab_size, self.hidden_size, "token_embedding", **kw)
    tokens = table(input_ids) if token_embeds is None else token_embeds.astype(self.dtype)
    positions = layers.embed(self.max_position_embeddings, self.hidden_size,
                             "position_embedding", **kw)(jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPEncoder(nn.Module):
  config: Mapping[str, Any]
  remat: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    for i in range(c["num_hidden_layers"]):
      x = layer_cls(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                    c["hidden_act"], c["layer_norm_eps"], self.attention, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"layers_{i}")(x)
    return x


class CLIPTextTransformer(nn.Module):
  """The body transformers calls `text_model` (its name in SD checkpoints)."""
  config: Mapping[str, Any]
  remat: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_embeds=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPTextEmbeddings(c["vocab_size"], c["hidden_size"], c["max_position_embeddings"],
                           name="embeddings", **kw)(input_ids, token_embeds)
    x = CLIPEncoder(c, self.remat, self.attention, name="encoder", **kw)(x)
    x = layers.layer_norm(c["layer_norm_eps"], "final_layer_norm", **kw)(x)
    # Pooling as transformers does: configs written before transformers PR #24773 say
    # eos_token_id=2 and pool at the highest id (EOS is the last CLIP token); newer ones pool at
    # the first EOS (the pad token may equal EOS).
    if c["eos_token_id"] == 2:
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      eos_pos = jnp.argmax((input_ids == c["eos_token_id"]).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
    return x, pooled


DEFAULT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407,
}


class CLIPTextModel(nn.Module):
  """`(input_ids [B, T] int) -> (last_hidden_state [B, T, D], pooled [B, D])`.

  Attributes:
    config: architecture keys of a transformers CLIPTextConfig (see `DEFAULT_CONFIG`).
    remat: rematerialise each encoder layer in the backward pass (saves activation memory
      when training through the encoder, e.g. textual inversion).
    attention: implementation for `attention.attention` (one of `attention.IMPLEMENTATIONS`).
    dtype: compute dtype (bf16 on accelerators); params stay in `param_dtype`.
  """
  config: Mapping[str, Any]
  remat: bool = False
  attention: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], *, source: str = "text_encoder config",
                  dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  remat: bool = False, attention: str = "auto") -> "CLIPTextModel":
    """Builds the model from a transformers `config.json` dict, rejecting what it can't run."""
    checked = check_config(config, SUPPORTED_CONFIG, source)
    arch = {**DEFAULT_CONFIG, **{k: v for k, v in checked.items() if k in DEFAULT_CONFIG}}
    if arch["hidden_size"] % arch["num_attention_heads"]:
      raise MedjaxError(f"{source}: config key 'num_attention_heads' = "
                        f"{arch['num_attention_heads']} does not divide hidden_size "
                        f"{arch['hidden_size']}")
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise MedjaxError(f"attention={attention!r} is not one of {attention_lib.IMPLEMENTATIONS}")
    return cls(config=arch, remat=remat, attention=attention, dtype=dtype,
               param_dtype=param_dtype)

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               token_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`token_embeds` [B, T, D], when given, replace the table lookup of `input_ids` (which
    still set the pooling position): textual inversion trains its rows without touching (or
    differentiating into) the whole vocabulary table."""
    if input_ids.ndim != 2:
      raise MedjaxError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
    if input_ids.shape[1] > self.config["max_position_embeddings"]:
      raise MedjaxError(f"{input_ids.shape[1]} tokens exceed max_position_embeddings "
                        f"{self.config['max_position_embeddings']}")
    if token_embeds is not None and token_embeds.shape != (*input_ids.shape,
                                                           self.config["hidden_size"]):
      raise MedjaxError(f"token_embeds must be [batch, tokens, {self.config['hidden_size']}], "
                        f"got shape {token_embeds.shape}")
    return CLIPTextTransformer(self.config, self.remat, self.attention, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="text_model")(input_ids,
                                                                                token_embeds)

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
    """Positional args for `init`: one full-length row of token ids per batch element."""
    return (jnp.zeros((batch, self.config["max_position_embeddings"]), jnp.int32),)


# -- the token-embedding table (textual inversion edits its rows) ----------------------------------

def token_embedding_table(params: Mapping[str, Any]) -> jax.Array:
  """The [vocab, dim] token-embedding table of `CLIPTextModel` params."""
  return params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def replace_token_embedding_table(params: Mapping[str, Any], table) -> dict:
  """New params dicts along the token-embedding path holding `table`; other leaves are shared."""
  emb = params["text_model"]["embeddings"]
  new_emb = {**emb, "token_embedding": {**emb["token_embedding"], "embedding": table}}
  return {**params, "text_model": {**params["text_model"], "embeddings": new_emb}}


def set_token_embeddings(params: Mapping[str, Any], ids: Sequence[int], rows) -> dict:
  """New params whose table holds `rows` ([len(ids), dim]) at `ids`, in the table's dtype.

  The table grows with zero rows when an id is past its end (the vocabulary grew); the caller
  sets the text encoder's `vocab_size` to the new row count.
  """
  table = token_embedding_table(params)
  old_vocab, dim = (int(n) for n in table.shape)
  new_vocab = max(old_vocab, max(ids) + 1)
  new_table = np.array(table, dtype=table.dtype) if new_vocab == old_vocab else np.concatenate(
      [np.asarray(table), np.zeros((new_vocab - old_vocab, dim), table.dtype)])
  new_table[list(ids)] = np.stack([np.asarray(r, np.float32) for r in rows]).astype(table.dtype)
  return replace_token_embedding_table(params, jnp.asarray(new_table))
