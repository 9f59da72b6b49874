"""Textual-inversion embedding files: diffusers and AUTOMATIC1111 formats, read and written.

Formats read (`read_embeddings`):
  * diffusers: `learned_embeds.safetensors` (or `.bin`), `{token: [dim] or [n, dim]}`.
  * AUTOMATIC1111 `.pt`: `{'string_to_param': {'*': [n, dim]}, 'name': ..., 'step': ...}`.
  * AUTOMATIC1111 / kohya `.safetensors`: a single `emb_params` (or `string_to_param.*`) tensor.
    safetensors cannot hold the nested dict, and the web UI names the token after the file.
  * a bare tensor in a `.pt`/`.bin` (a token must be given).
Pickles (`.pt`, `.bin`) are only read with `allow_pickle=True`, via `torch.load(weights_only=True)`.

`StableDiffusion.load_embeddings` adds what these files hold to a model (as diffusers'
`load_textual_inversion` does; see `medjax.tokenizer` for the token names).
"""
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
  return {t: as_vectors(e, f"{path}: embedding {t!r}") for t, e in out.items()}


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


def as_vectors(x, what: str) -> np.ndarray:
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
  check_token(token, str(path))
  weights.write_safetensors({token: as_vectors(emb, f"{path}: embedding {token!r}")}, path)
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
  check_token(token, str(path))
  emb = as_vectors(embedding, f"{path}: embedding {token!r}")
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


def check_token(token, where: str) -> None:
  """A token name must be a non-empty string without outer spaces (the tokenizer strips them)."""
  if not isinstance(token, str) or not token or token != token.strip():
    raise MedjaxError(f"{where}: token {token!r} must be a non-empty string without "
                      "leading/trailing spaces")
