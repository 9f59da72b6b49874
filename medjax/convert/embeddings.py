"""Textual-inversion embeddings: diffusers and AUTOMATIC1111 files, and adding them to a model.

Formats read (`read_embeddings`):
  * diffusers: `learned_embeds.safetensors` (or `.bin`), `{token: [dim] or [n, dim]}`.
  * AUTOMATIC1111 `.pt`: `{'string_to_param': {'*': [n, dim]}, 'name': ..., 'step': ...}`.
  * AUTOMATIC1111 / kohya `.safetensors`: a single `emb_params` (or `string_to_param.*`) tensor.
    safetensors cannot hold the nested dict, and the web UI names the token after the file.
  * a bare tensor in a `.pt`/`.bin` (a token must be given).
Pickles (`.pt`, `.bin`) are only read with `allow_pickle=True`, via `torch.load(weights_only=True)`.

Adding tokens follows diffusers' `load_textual_inversion` exactly, so prompts encode to the same
ids: an n-vector token `tok` becomes tokens `tok, tok_1, ..., tok_{n-1}`, and prompts are
expanded (`tok` -> `tok tok_1 ... tok_{n-1}`) before tokenizing, as `maybe_convert_prompt` does.
"""
import copy
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from medjax.atomic import atomic_path
from medjax.convert import weights
from medjax.errors import MedjaxError

DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_KEYS = ("emb_params", "string_to_param.*")
_PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")


# -- reading -------------------------------------------------------------------------------------

def read_embeddings(path, *, token: str | None = None,
                    allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a textual-inversion file (or a folder holding `learned_embeds.*`).

  Args:
    path: a `.safetensors`, `.pt` or `.bin` file, or a diffusers folder.
    token: the token to name the embedding (overrides the file's own name; the file must then
      hold a single embedding).
    allow_pickle: read `.pt`/`.bin` pickles (with `torch.load(weights_only=True)`).

  Returns:
    {token: float array [n_vectors, dim]}, in the file's dtype.
  """
  path = Path(path)
  if path.is_dir():
    found = [path / n for n in DIFFUSERS_NAMES if (path / n).is_file()]
    if not found:
      raise MedjaxError(f"{path}: no textual-inversion file (expected one of "
                        f"{', '.join(DIFFUSERS_NAMES)})")
    path = found[0]
  if not path.is_file():
    raise MedjaxError(f"{path}: no such textual-inversion file")
  if path.suffix == ".safetensors":
    raw = weights.read_safetensors(path)
    out = _from_flat(raw, path)
  elif path.suffix in _PICKLE_SUFFIXES:
    out = _from_pickle(weights.torch_load(path, allow_pickle), path)
  else:
    raise MedjaxError(f"{path}: unknown embedding file type (expected .safetensors, .pt or .bin)")
  if token is not None:
    if len(out) != 1:
      raise MedjaxError(f"{path}: holds {len(out)} embeddings ({', '.join(out)}); "
                        f"cannot name them all {token!r}")
    out = {token: next(iter(out.values()))}
  return {t: _as_vectors(e, f"{path}: embedding {t!r}") for t, e in out.items()}


def _from_flat(sd: dict, path: Path) -> dict[str, Any]:
  """A flat {name: tensor} dict: A1111/kohya (`emb_params`) or diffusers ({token: tensor})."""
  if not sd:
    raise MedjaxError(f"{path}: holds no tensors (expected a textual-inversion embedding)")
  if {"clip_l", "clip_g"} <= set(sd):
    raise MedjaxError(f"{path}: is an SDXL embedding (clip_l + clip_g); medjax loads SD 1.x/2.x "
                      "embeddings (one text encoder)")
  a1111 = [k for k in sd if k in A1111_KEYS]
  if a1111:
    if len(sd) != 1:
      raise MedjaxError(f"{path}: AUTOMATIC1111 embedding must hold one tensor "
                        f"({a1111[0]!r}), found {sorted(sd)}")
    return {path.stem: sd[a1111[0]]}
  return dict(sd)


def _from_pickle(obj, path: Path) -> dict[str, Any]:
  """A torch.load result: A1111 dict, diffusers {token: tensor}, or a bare tensor."""
  if hasattr(obj, "detach"):
    return {path.stem: obj}
  if not isinstance(obj, dict):
    raise MedjaxError(f"{path}: expected a dict of tensors or an AUTOMATIC1111 embedding, "
                      f"got {type(obj).__name__}")
  if "string_to_param" in obj:
    params = obj["string_to_param"]
    params = getattr(params, "_parameters", params)  # torch 1.11 saved a ParameterDict
    if not isinstance(params, Mapping) or len(params) != 1:
      raise MedjaxError(f"{path}: AUTOMATIC1111 'string_to_param' must hold one tensor "
                        f"(key '*'), got {list(params) if isinstance(params, Mapping) else params}")
    # The web UI names the token after the file; diffusers uses 'name'. Follow the web UI.
    return {path.stem: next(iter(params.values()))}
  tensors = {k: v for k, v in obj.items() if hasattr(v, "detach")}
  if len(tensors) != len(obj) or not tensors:
    raise MedjaxError(f"{path}: expected {{token: tensor}} or an AUTOMATIC1111 embedding with "
                      f"'string_to_param', got keys {sorted(map(str, obj))[:8]}")
  return _from_flat(tensors, path)


def _as_vectors(x, what: str) -> np.ndarray:
  """Any tensor/array -> a NumPy float array [n, dim] (a [dim] vector becomes [1, dim])."""
  if hasattr(x, "detach"):
    x = weights.torch_to_numpy(x)
  a = np.array(x)  # a copy: never a view into a memory-mapped file
  if a.ndim == 1:
    a = a[None]
  if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
    raise MedjaxError(f"{what}: expected shape [dim] or [n_vectors, dim], got {a.shape}")
  if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
    raise MedjaxError(f"{what}: expected a float tensor, got {a.dtype}")
  return a


# -- writing -------------------------------------------------------------------------------------

def write_diffusers_embeddings(path, embeddings: Mapping[str, Any]) -> Path:
  """Writes `{token: [n, dim]}` as diffusers' `learned_embeds.safetensors`.

  `path` is a folder (the file goes in it) or a `.safetensors` file; either loads with
  `pipe.load_textual_inversion(path)`, which reads one token per file. Returns the file.
  """
  path = Path(path)
  if path.suffix != ".safetensors":
    path = path / DIFFUSERS_NAMES[0]
  if len(embeddings) != 1:
    raise MedjaxError(f"{path}: diffusers' textual-inversion format holds exactly one token, "
                      f"got {len(embeddings)} ({', '.join(map(str, embeddings))})")
  token, emb = next(iter(embeddings.items()))
  _check_token(token, str(path))
  weights.write_safetensors({token: _as_vectors(emb, f"{path}: embedding {token!r}")}, path)
  return path


def write_a1111_embeddings(path, token: str, embedding, *, step: int | None = None,
                           sd_checkpoint: str | None = None,
                           sd_checkpoint_name: str | None = None,
                           allow_pickle: bool = False) -> Path:
  """Writes an AUTOMATIC1111 embedding; the web UI names the token after the file stem.

  `.safetensors` (the default) holds one tensor `emb_params` [n, dim] (as kohya's scripts write
  it; the web UI and diffusers read single-tensor files) and the rest as string metadata.
  `.pt` (only with `allow_pickle=True`) is the web UI's own layout: `string_to_token`,
  `string_to_param: {'*': tensor}`, `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name`.
  """
  path = Path(path)
  _check_token(token, str(path))
  emb = _as_vectors(embedding, f"{path}: embedding {token!r}")
  if path.suffix == ".safetensors":
    meta = {"name": token, "step": "" if step is None else int(step),
            "sd_checkpoint": sd_checkpoint or "", "sd_checkpoint_name": sd_checkpoint_name or "",
            "format": "a1111"}
    weights.write_safetensors({"emb_params": emb}, path, metadata=meta)
    return path
  if path.suffix != ".pt":
    raise MedjaxError(f"{path}: AUTOMATIC1111 embeddings are .safetensors or .pt files")
  if not allow_pickle:
    raise MedjaxError(f"{path}: writing a .pt pickle needs explicit opt-in (allow_pickle=True); "
                      "prefer .safetensors")
  import torch  # pylint: disable=g-import-not-at-top
  data = {"string_to_token": {"*": 265},  # the web UI writes the id of '*' in CLIP's vocab
          "string_to_param": {"*": torch.from_numpy(np.asarray(emb, np.float32)
                                                    if emb.dtype.name == "bfloat16" else emb)},
          "name": token, "step": None if step is None else int(step),
          "sd_checkpoint": sd_checkpoint, "sd_checkpoint_name": sd_checkpoint_name}
  with atomic_path(path) as tmp:
    torch.save(data, tmp)
  return path


def _check_token(token, where: str) -> None:
  if not isinstance(token, str) or not token or token != token.strip():
    raise MedjaxError(f"{where}: token {token!r} must be a non-empty string without "
                      "leading/trailing spaces")


# -- adding tokens to a model --------------------------------------------------------------------

class ExpandingTokenizer:
  """A CLIP tokenizer that expands multi-vector tokens in prompts before tokenizing.

  `tok` -> `tok tok_1 ... tok_{n-1}`, exactly as diffusers' `maybe_convert_prompt` does, so
  medjax and diffusers give the same ids. Everything else is delegated to the wrapped tokenizer.
  """

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  @property
  def base(self):
    return self._tokenizer

  def expand_prompt(self, prompt: str) -> str:
    """diffusers' `_maybe_convert_prompt` (longest tokens first, so it is deterministic)."""
    added = self._tokenizer.added_tokens_encoder
    for token in sorted(set(self._tokenizer.tokenize(prompt)), key=lambda t: (-len(t), t)):
      if token in added and f"{token}_1" in added:
        replacement, i = token, 1
        while f"{token}_{i}" in added:
          replacement += f" {token}_{i}"
          i += 1
        prompt = prompt.replace(token, replacement)
    return prompt

  def __call__(self, text, *args, **kwargs):
    if isinstance(text, str):
      text = self.expand_prompt(text)
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
      text = [self.expand_prompt(t) for t in text]
    return self._tokenizer(text, *args, **kwargs)

  def __len__(self):
    return len(self._tokenizer)

  def __getattr__(self, name):
    if name == "_tokenizer":  # not set yet (copy/pickle): avoid recursing
      raise AttributeError(name)
    return getattr(self._tokenizer, name)


def expanding_if_multi_vector(tokenizer):
  """Wraps a tokenizer holding multi-vector tokens (`tok`, `tok_1`, ...) so prompts expand them,
  as diffusers does for a pipeline saved after `load_textual_inversion`."""
  added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
  if any(f"{t}_1" in added for t in added):
    return ExpandingTokenizer(tokenizer)
  return tokenizer


def _base_tokenizer(tok):
  return tok.base if isinstance(tok, ExpandingTokenizer) else tok


def token_embedding_table(params: dict):
  return params["text_model"]["embeddings"]["token_embedding"]["embedding"]


def add_tokens(sd, embeddings: Mapping[str, Any], *, sources: Mapping[str, Any] | None = None):
  """A new `StableDiffusion` with `embeddings` ({token: [n, dim]}) added; `sd` stays valid.

  Tokens are added as diffusers' `load_textual_inversion` adds them (`tok`, `tok_1`, ...), the
  token-embedding table grows if needed, and the tokenizer is saved to a new folder so that
  `save_pretrained` exports the added tokens too. `sources` ({token: file}) names the files
  in error messages.
  """
  sources = sources or {}
  where = lambda t: f"{sources[t]}: embedding {t!r}" if t in sources else f"embedding {t!r}"
  if not embeddings:
    raise MedjaxError("add_tokens: no embeddings given")
  base = _base_tokenizer(sd.tokenizer)
  vocab = base.get_vocab()
  table = token_embedding_table(sd.params["text_encoder"])
  dim = int(table.shape[-1])
  names, rows = [], []
  for token, emb in embeddings.items():
    _check_token(token, "add_tokens")
    emb = _as_vectors(emb, where(token))
    if emb.shape[1] != dim:
      raise MedjaxError(f"{where(token)} has width {emb.shape[1]}, but the text encoder's "
                        f"token embeddings are {dim} wide (trained for another base model?)")
    if not np.all(np.isfinite(np.asarray(emb, np.float32))):
      raise MedjaxError(f"{where(token)} holds NaN or infinite values")
    expanded = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
    for name in expanded + [f"{token}_1"]:
      if name in vocab or name in names:
        raise MedjaxError(f"token {name!r} is already in the tokenizer vocabulary; choose "
                          "another token name")
    names += expanded
    rows += list(emb)
  tok = copy.deepcopy(base)
  ids = []
  for name in names:
    tok.add_tokens(name)
    ids.append(int(tok.convert_tokens_to_ids(name)))
  old_vocab = int(table.shape[0])
  new_vocab = max(old_vocab, max(ids) + 1)
  new_table = np.array(table, dtype=table.dtype) if new_vocab == old_vocab else np.concatenate(
      [np.asarray(table), np.zeros((new_vocab - old_vocab, dim), table.dtype)])
  new_table[ids] = np.stack([np.asarray(r, np.float32) for r in rows]).astype(table.dtype)
  params = _replace_table(sd.params, jnp.asarray(new_table))
  configs = dict(sd.configs)
  configs["text_encoder"] = {**sd.configs["text_encoder"], "vocab_size": new_vocab}
  text_encoder = sd.text_encoder.clone(config={**sd.text_encoder.config, "vocab_size": new_vocab})
  tokenizer_dir = Path(tempfile.mkdtemp(prefix="medjax-tokenizer-"))
  tok.save_pretrained(str(tokenizer_dir))
  return dataclasses.replace(sd, text_encoder=text_encoder, params=params,
                             tokenizer=ExpandingTokenizer(tok), tokenizer_dir=tokenizer_dir,
                             configs=configs)


def _replace_table(params: dict, table) -> dict:
  """New params dicts along the token-embedding path; every other leaf is shared."""
  te = params["text_encoder"]
  emb = te["text_model"]["embeddings"]
  new_emb = {**emb, "token_embedding": {**emb["token_embedding"], "embedding": table}}
  new_te = {**te, "text_model": {**te["text_model"], "embeddings": new_emb}}
  return {**params, "text_encoder": new_te}


def load_embeddings(sd, paths_or_dict, tokens: str | Sequence[str | None] | None = None,
                    allow_pickle: bool = False):
  """Reads embedding files (or takes {token: array}) and returns `add_tokens(sd, ...)`.

  Args:
    sd: a `StableDiffusion`.
    paths_or_dict: a path, a list of paths, or {token: [n, dim]}.
    tokens: token names, one per path (None keeps the file's own name).
    allow_pickle: read `.pt`/`.bin` files (torch.load with weights_only=True).
  """
  if isinstance(paths_or_dict, Mapping):
    if tokens is not None:
      raise MedjaxError("load_embeddings: `tokens` names files' embeddings; a dict already "
                        "names its tokens")
    return add_tokens(sd, paths_or_dict)
  paths = [paths_or_dict] if isinstance(paths_or_dict, (str, os.PathLike)) else list(paths_or_dict)
  names = [tokens] if tokens is None or isinstance(tokens, str) else list(tokens)
  if len(names) == 1 and len(paths) > 1 and names[0] is None:
    names = names * len(paths)
  if len(names) != len(paths):
    raise MedjaxError(f"load_embeddings: {len(paths)} files but {len(names)} tokens")
  merged, sources = {}, {}
  for path, name in zip(paths, names):
    for token, emb in read_embeddings(path, token=name, allow_pickle=allow_pickle).items():
      if token in merged:
        raise MedjaxError(f"{path}: token {token!r} is also in {sources[token]}")
      merged[token], sources[token] = emb, str(path)
  return add_tokens(sd, merged, sources=sources)
