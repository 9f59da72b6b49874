"""What a single-file checkpoint cannot say by its tensors, said beside them.

An original SD checkpoint holds weights only: head counts, norm groups, the scheduler and the
tokenizer are not in it, and medjax falls back to Stable Diffusion's values. So a file medjax
writes carries its model in the safetensors metadata (`medjax.configs`, `medjax.scheduler`,
`medjax.tokenizer`: JSON strings, which AUTOMATIC1111 and ComfyUI show and otherwise ignore),
and re-imports as exactly the model that was exported, whatever its config. For other files,
AUTOMATIC1111's own convention applies: a `<checkpoint>.yaml` beside the file whose
`parameterization: "v"` marks a v-prediction model (SD 2.x 768-v).
"""
import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

from absl import logging

from medjax import tokenizer as tokenizer_lib
from medjax.convert import weights
from medjax.errors import MedjaxError

CONFIGS, SCHEDULER, TOKENIZER = "medjax.configs", "medjax.scheduler", "medjax.tokenizer"
COMPONENTS = ("unet", "vae", "text_encoder")
# Tokenizer folders up to this size travel in the file (the real CLIP vocabulary is ~3.5 MB).
MAX_TOKENIZER_BYTES = 8 << 20


class Extras(NamedTuple):
  """What a file (or its sidecar) says beyond its tensors; None where it says nothing."""
  configs: dict | None
  scheduler_config: dict | None
  tokenizer_dir: Path | None
  prediction_type: str | None  # from an AUTOMATIC1111 sidecar yaml


def encode(configs: dict, scheduler_config: dict, tokenizer_dir) -> dict[str, str]:
  """Metadata entries for a single file: the component configs, scheduler and tokenizer."""
  meta = {CONFIGS: json.dumps({n: configs[n] for n in COMPONENTS}, sort_keys=True),
          SCHEDULER: json.dumps(scheduler_config, sort_keys=True)}
  files = {p.name: p for p in sorted(Path(tokenizer_dir).iterdir()) if p.is_file()}
  size = sum(p.stat().st_size for p in files.values())
  if size <= MAX_TOKENIZER_BYTES:
    meta[TOKENIZER] = json.dumps({name: p.read_text(encoding="utf-8")
                                  for name, p in files.items()}, sort_keys=True)
  else:
    logging.warning("%s: tokenizer of %d bytes left out of the single file (it loads with the "
                    "standard CLIP tokenizer)", tokenizer_dir, size)
  return meta


def read(path) -> Extras:
  """The configs, scheduler and tokenizer a single file carries, else its sidecar's scheduler."""
  path = Path(path)
  meta = weights.read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
  configs = _json(meta, CONFIGS, path)
  if configs is not None and (not isinstance(configs, dict)
                              or not all(isinstance(configs.get(n), dict) for n in COMPONENTS)):
    raise MedjaxError(f"{path}: metadata {CONFIGS} is not {{'unet', 'vae', 'text_encoder'}} -> "
                      "config")
  scheduler = _json(meta, SCHEDULER, path)
  if scheduler is not None and not isinstance(scheduler, dict):
    raise MedjaxError(f"{path}: metadata {SCHEDULER} is not a scheduler config object")
  files = _json(meta, TOKENIZER, path)
  tokenizer_dir = _tokenizer_dir(files, path) if files is not None else None
  return Extras(configs, scheduler, tokenizer_dir,
                sidecar_prediction_type(path) if scheduler is None else None)


def _json(meta: dict, key: str, path: Path):
  if key not in meta:
    return None
  try:
    return json.loads(meta[key])
  except ValueError as e:
    raise MedjaxError(f"{path}: metadata {key} is not valid JSON ({e})") from None


def _tokenizer_dir(files, path: Path) -> Path:
  """The tokenizer files as a folder, written once per content (by hash) and reused."""
  if not (isinstance(files, dict) and files and all(
      isinstance(k, str) and re.fullmatch(r"[\w.-]+", k) and isinstance(v, str)
      for k, v in files.items())):
    raise MedjaxError(f"{path}: metadata {TOKENIZER} is not {{file name: text}}")
  digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]

  def write(folder: Path) -> None:
    for name, text in files.items():
      (folder / name).write_text(text, encoding="utf-8")
  return tokenizer_lib.cached_tokenizer_dir(f"file-tokenizer-{digest}", write)


def sidecar_prediction_type(path) -> str | None:
  """AUTOMATIC1111's `<checkpoint>.yaml`: `parameterization: "v"` -> 'v_prediction'; None
  without a sidecar or for 'eps'."""
  path = Path(path)
  yaml = path.with_suffix(".yaml")
  if not yaml.is_file():
    return None
  match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"),
                    re.MULTILINE)
  if match is None or match.group(1) == "eps":
    return None
  if match.group(1) != "v":
    raise MedjaxError(f"{yaml}: parameterization {match.group(1)!r}; medjax reads 'eps' or 'v'")
  return "v_prediction"
