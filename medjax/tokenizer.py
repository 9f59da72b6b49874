"""CLIP tokenizer files and prompt tokenization, without downloads.

Stable Diffusion tokenizes prompts with `transformers.CLIPTokenizer` (byte-level BPE). medjax writes
the tokenizer folder itself, in the layout of the hub's `openai/clip-vit-large-patch14/`, either
from the real BPE merges that ship with OpenAI CLIP / open_clip (`bpe_simple_vocab_16e6.txt.gz`)
or from a tiny deterministic BPE learned from medical prompt words, for tests and tiny models.

Tokens added for textual inversion follow diffusers' `load_textual_inversion`, so prompts encode
to the same ids: an n-vector token `tok` becomes tokens `tok, tok_1, ..., tok_{n-1}`, and prompts
are expanded (`tok` -> `tok tok_1 ... tok_{n-1}`) before tokenizing, as `maybe_convert_prompt`
does (`ExpandingTokenizer`).
"""
import atexit
import collections
import copy
import functools
import gzip
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import transformers

from medjax.errors import MedjaxError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI's vocabulary: 256 bytes, 256 bytes + '</w>', 48894 merges, BOS, EOS = 49408 tokens.
NUM_CLIP_MERGES = 49152 - 256 - 2

# Words the tiny tokenizer learns as whole tokens (anything else falls back to smaller pieces).
TINY_WORDS = (
    "a an the of with and or no not without photo image scan view study report finding findings "
    "normal abnormal healthy diseased chest x-ray radiograph frontal lateral pa ap pleural "
    "effusion pneumothorax pneumonia cardiomegaly edema consolidation atelectasis opacity "
    "nodule mass fracture lung lungs heart left right bilateral small large mild moderate "
    "severe prostate mri ct t1 t2 weighted axial sagittal coronal lesion tumor benign "
    "malignant brain knee breast mammogram ultrasound skin dermoscopy retina fundus "
    "histopathology slide patient male female adult child year old medical high quality"
).split()


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable unicode map (the 256 base tokens, in order)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def _vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  base = list(bytes_to_unicode().values())
  return base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]


def _normalise_merges(merges: Iterable) -> list[tuple[str, str]]:
  out = []
  for m in merges:
    pair = tuple(m.split()) if isinstance(m, str) else tuple(m)
    if len(pair) != 2:
      raise MedjaxError(f"BPE merge {m!r} is not a pair of symbols")
    out.append(pair)
  return out


def write_clip_tokenizer(out_dir, merges: Iterable, *, pad_token: str = EOS,
                         model_max_length: int = 77) -> int:
  """Writes a CLIPTokenizer folder (vocab.json, merges.txt, two JSON configs).

  Args:
    out_dir: folder to create or overwrite files in.
    merges: BPE merges in rank order, as pairs or "a b" strings.
    pad_token: SD1 pads with EOS (the default), SD2 with "!".
    model_max_length: prompts are padded/truncated to this many tokens.

  Returns:
    The vocabulary size (the text encoder's `vocab_size`).
  """
  merges = _normalise_merges(merges)
  vocab = _vocab(merges)
  encoder = {tok: i for i, tok in enumerate(vocab)}
  if len(encoder) != len(vocab):
    dupes = [t for t, c in collections.Counter(vocab).items() if c > 1]
    raise MedjaxError(f"BPE merges produce duplicate tokens, e.g. {dupes[:3]}")
  if pad_token not in encoder:
    raise MedjaxError(f"pad_token {pad_token!r} is not in the vocabulary")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  special = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False}
  tokens = {"bos_token": special(BOS), "eos_token": special(EOS), "pad_token": pad_token,
            "unk_token": special(EOS)}
  config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace",
            "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer", **tokens}
  _write(out / "vocab.json", json.dumps(encoder, ensure_ascii=False))
  _write(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  _write(out / "special_tokens_map.json", json.dumps(tokens, indent=2))
  _write(out / "tokenizer_config.json", json.dumps(config, indent=2))
  return len(vocab)


def _write(path: Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)


def write_clip_tokenizer_from_bpe(bpe_gz_path, out_dir, **kw) -> int:
  """The real CLIP tokenizer (49408 tokens) from `bpe_simple_vocab_16e6.txt.gz`.

  The file ships with OpenAI's `clip` and with `open_clip` packages; the merges are taken as
  their SimpleTokenizer does (lines 1 .. 48894, after a version header).
  """
  try:
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise MedjaxError(f"{bpe_gz_path}: not a readable CLIP BPE file ({e})") from e
  merges = lines[1:NUM_CLIP_MERGES + 1]
  if len(merges) != NUM_CLIP_MERGES:
    raise MedjaxError(f"{bpe_gz_path}: has {len(merges)} merges, CLIP needs {NUM_CLIP_MERGES}")
  return write_clip_tokenizer(out_dir, merges, **kw)


def _pretokenize(text: str) -> list[str]:
  # CLIP's split for ASCII text: letters runs, single digits, punctuation runs.
  return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
  """Merges (in rank order) that make every given word a single token, ties broken by name.

  Each word starts as characters with '</w>' on the last one, as CLIP's BPE does. A merge whose
  result would duplicate an existing token is skipped (the vocabulary must stay a bijection).
  """
  counts = collections.Counter(w for text in words for w in _pretokenize(text))
  seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts}
  known = set(_vocab([]))
  merges, banned = [], set()
  while True:
    pairs = collections.Counter()
    for w, seq in seqs.items():
      for pair in zip(seq, seq[1:], strict=False):  # neighbours: one shorter
        if pair not in banned:
          pairs[pair] += counts[w]
    if not pairs:
      return merges
    pair = min(pairs, key=lambda p: (-pairs[p], p))
    if "".join(pair) in known:
      banned.add(pair)
      continue
    merges.append(pair)
    known.add("".join(pair))
    seqs = {w: _merge(seq, pair) for w, seq in seqs.items()}


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(seq):
    if i < len(seq) - 1 and (seq[i], seq[i + 1]) == pair:
      out.append(seq[i] + seq[i + 1])
      i += 2
    else:
      out.append(seq[i])
      i += 1
  return tuple(out)


def write_tiny_clip_tokenizer(out_dir, *, words: Sequence[str] = TINY_WORDS, **kw) -> int:
  """A small deterministic CLIP tokenizer (< 1000 tokens) for tiny models and tests."""
  return write_clip_tokenizer(out_dir, learn_bpe(words), **kw)


def load_tokenizer(folder):
  """`transformers.CLIPTokenizer` from a folder (e.g. `<model>/tokenizer`), offline."""
  folder = Path(folder)
  # transformers < 5 writes vocab.json + merges.txt; transformers 5 only tokenizer.json.
  files = ("tokenizer.json",) if (folder / "tokenizer.json").is_file() else ("vocab.json",
                                                                              "merges.txt")
  for name in files:
    if not (folder / name).is_file():
      raise MedjaxError(f"{folder}: not a CLIP tokenizer folder ({name} is missing; "
                        "expected tokenizer.json, or vocab.json and merges.txt)")
  try:
    json.loads((folder / files[0]).read_text(encoding="utf-8"))
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
  except Exception as e:  # corrupt JSON, bad merges, ...: transformers raises many types
    raise MedjaxError(f"{folder}: cannot load the CLIP tokenizer ({type(e).__name__}: {e})") from e


def tokenize(tokenizer, prompts: str | Sequence[str]) -> np.ndarray:
  """Prompts -> int32 ids [B, model_max_length], padded and truncated as diffusers' SD does."""
  if isinstance(prompts, str):
    prompts = [prompts]
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return np.asarray(ids, np.int32)


def find_clip_bpe() -> Path | None:
  """The real CLIP BPE file shipped inside the open_clip_torch wheel, found without importing it."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
  return path if path.is_file() else None


def cached_tokenizer_dir(name: str, write: Callable[[Path], object]) -> Path:
  """A tokenizer folder `<tmp>/medjax-<name>`, written once by `write(dir)` (atomically), reused."""
  final = Path(tempfile.gettempdir()) / f"medjax-{name}"
  if not final.is_dir():
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
      write(tmp)
      os.rename(tmp, final)
    except OSError:  # another process won the race; its copy is identical
      pass
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return final


def default_clip_tokenizer_dir(pad_token: str = EOS, **kw) -> Path:
  """The real CLIP tokenizer (SD1: pad '<|endoftext|>', SD2: pad '!') from open_clip's BPE file."""
  bpe = find_clip_bpe()
  if bpe is None:
    raise MedjaxError("no CLIP tokenizer given and open_clip_torch (which ships the CLIP BPE "
                      "vocabulary) is not installed: pass tokenizer=<folder with vocab.json and "
                      "merges.txt>, or `pip install --no-deps open_clip_torch`")
  key = "clip-tokenizer-" + ("pad-bang" if pad_token == "!" else "pad-eos")
  return cached_tokenizer_dir(
      key, lambda d: write_clip_tokenizer_from_bpe(bpe, d, pad_token=pad_token, **kw))


# -- added (textual-inversion) tokens --------------------------------------------------------------

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


def base_tokenizer(tokenizer):
  """The `transformers.CLIPTokenizer` itself, unwrapped from an `ExpandingTokenizer`."""
  return tokenizer.base if isinstance(tokenizer, ExpandingTokenizer) else tokenizer


def add_tokens(tokenizer, names: Sequence[str]) -> tuple[ExpandingTokenizer, list[int], Path]:
  """A copy of `tokenizer` with `names` added (in order), their ids, and its saved folder.

  `tokenizer` stays unchanged. The copy is saved to a new folder so that an export carries the
  added tokens too; the folder is removed when the process exits.
  """
  tok = copy.deepcopy(base_tokenizer(tokenizer))
  ids = []
  for name in names:
    tok.add_tokens(name)
    ids.append(int(tok.convert_tokens_to_ids(name)))
  folder = Path(tempfile.mkdtemp(prefix="medjax-tokenizer-"))
  atexit.register(shutil.rmtree, folder, ignore_errors=True)
  tok.save_pretrained(str(folder))
  return ExpandingTokenizer(tok), ids, folder
