"""Where pretrained weights come from: the one resolver behind every command's `pretrained`.

A spec names, tried in this order:
  * a local directory: a diffusers pipeline (PyTorch `.safetensors`/`.bin`, or the old Flax
    `*.msgpack` of FlaxStableDiffusionPipeline);
  * a local file: a single-file checkpoint (AUTOMATIC1111 / ComfyUI `.safetensors`; `.ckpt`,
    `.pt` only with allow_pickle);
  * a Hugging Face id `org/name[@revision]`, found in the local Hugging Face cache only (medjax
    never downloads): its snapshot folder, a diffusers pipeline, or the one single file of a
    repo that holds just that;
  * `org/name[@revision]/file.safetensors`: one cached file of a repo, a single file.
Anything else is one error naming what was tried.
"""
import dataclasses
import os
import re
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub import try_to_load_from_cache

from medjax.errors import MedjaxError

DIFFUSERS, SINGLE_FILE = "diffusers", "single_file"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HF_PART = re.compile(r"[A-Za-z0-9][\w.-]*")


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved spec: `kind` (DIFFUSERS or SINGLE_FILE), the local `path`, and `name` (what the
  user gave: a path, or the Hugging Face id, recorded as the model's name)."""
  kind: str
  path: Path
  name: str


def resolve(spec: str) -> Source:
  """The local weights `spec` names (see the module docstring)."""
  spec = str(spec).strip()
  if not spec:
    raise MedjaxError("pretrained: empty (give a diffusers directory, a single-file checkpoint "
                      "or a Hugging Face id)")
  local = Path(os.path.expanduser(spec))
  if local.is_dir():
    return Source(DIFFUSERS, local, spec)
  if local.exists():
    return Source(SINGLE_FILE, local, spec)
  hf = parse_hf_id(spec)
  if hf is None:
    raise MedjaxError(f"{spec}: no such file or directory (expected a diffusers directory, a "
                      "single-file checkpoint, or a Hugging Face id org/name)")
  return _from_hf_cache(spec, *hf)


def parse_hf_id(spec: str) -> tuple[str, str | None, str | None] | None:
  """'org/name[@rev][/file]' -> (repo id, revision, file in the repo); None if not of that form."""
  parts = spec.split("/")
  if len(parts) < 2 or spec.startswith(("/", "~")):
    return None
  name, _, revision = parts[1].partition("@")
  if not (_HF_PART.fullmatch(parts[0]) and _HF_PART.fullmatch(name)) or ".." in parts:
    return None
  file = "/".join(parts[2:]) or None
  if file is not None and not file.endswith(SINGLE_FILE_SUFFIXES):
    return None
  return f"{parts[0]}/{name}", revision or None, file


def hf_cache_dir() -> str:
  """The Hugging Face hub cache: $HF_HUB_CACHE as set now, else huggingface_hub's default."""
  return os.environ.get("HF_HUB_CACHE") or hf_constants.HF_HUB_CACHE


def _from_hf_cache(spec: str, repo: str, revision: str | None, file: str | None) -> Source:
  cache = hf_cache_dir()
  where = f"{repo}{'@' + revision if revision else ''}"
  absent = (f"{spec}: no such local path, and {where} is not in the local Hugging Face cache "
            f"({cache}); medjax never downloads: fetch it once (`hf download {repo}`"
            f"{' --revision ' + revision if revision else ''}) or give a local path")
  if file is not None:
    found = try_to_load_from_cache(repo, file, cache_dir=cache, revision=revision)
    if not isinstance(found, str):
      raise MedjaxError(absent.replace(f" {where} is", f" {file} of {where} is", 1))
    return Source(SINGLE_FILE, Path(found), spec)
  try:
    folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                    local_files_only=True))
  except (OSError, ValueError):  # huggingface_hub's LocalEntryNotFoundError and friends
    raise MedjaxError(absent) from None
  if not (folder / "model_index.json").is_file():
    singles = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    if len(singles) == 1:  # a repo holding one single-file checkpoint
      return Source(SINGLE_FILE, singles[0], spec)
  return Source(DIFFUSERS, folder, spec)
