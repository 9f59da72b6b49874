"""The index entry every loader produces: small, picklable, and free of DICOM identifiers.

Loaders only build indices (lists of `Record`); pixels are read later inside the input pipeline,
so building an index over 200k images stays cheap and worker processes receive small objects.
"""
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from medjax.errors import MedjaxError


@dataclasses.dataclass(frozen=True)
class Record:
  """One training example before decoding.

  Attributes:
    key: unique, human-readable id (dataset-relative path; dataset pseudonyms only).
    patient_id: dataset pseudonym used for patient-level splits.
    kind: how the pipeline produces pixels: 'file' (read_image), 'picai' (MRI slice),
      'phantom_cxr' or 'phantom_mri' (generated on the fly).
    path: the image file for 'file' records, the T2W file for 'picai'.
    labels: label name -> 1.0 / 0.0; a missing name means unknown / ignored.
    modality: words for prompts ('chest x-ray', 'prostate mri').
    view: e.g. 'PA', 'AP', 'LATERAL' ('' if unknown).
    source_split: the dataset's own split ('train', 'val', 'test', or '').
    report: report sections (lower-case name -> text), if loaded.
    extra: loader-specific tuple of (name, value) pairs (e.g. PI-CAI slice index, phantom seed).
    class_index: set by class selection; -1 when no classes are configured.
  """
  key: str
  patient_id: str
  kind: str
  path: str = ""
  labels: Mapping[str, float] = dataclasses.field(default_factory=dict)
  modality: str = ""
  view: str = ""
  source_split: str = ""
  report: Mapping[str, str] | None = None
  extra: tuple[tuple[str, Any], ...] = ()
  class_index: int = -1

  def get(self, name: str, default=None):
    """Looks up a loader-specific `extra` value."""
    for key, value in self.extra:
      if key == name:
        return value
    return default


@dataclasses.dataclass
class DataIndex:
  """A loader's result: records, the label vocabulary, and what was skipped while indexing."""
  records: list[Record]
  label_names: tuple[str, ...]
  source: str
  skipped: list[str] = dataclasses.field(default_factory=list)
  class_names: tuple[str, ...] = ()

  def replace(self, records: Sequence[Record], **changes) -> "DataIndex":
    return dataclasses.replace(self, records=list(records), **changes)


class BadFiles:
  """Implements `on_bad_file`: raise at once ('error') or collect 'file: problem' ('skip')."""

  def __init__(self, policy: str):
    if policy not in ("error", "skip"):
      raise MedjaxError(f"on_bad_file={policy!r}: expected 'error' or 'skip'")
    self.policy = policy
    self.skipped: list[str] = []

  def __call__(self, message: str) -> None:
    if self.policy == "error":
      raise MedjaxError(message)
    self.skipped.append(message)


def source_split_name(name: str) -> str:
  """Maps dataset split spellings ('valid', 'validate', 'validation') onto train/val/test."""
  lowered = name.strip().lower()
  if lowered in ("valid", "validate", "validation", "val", "dev"):
    return "val"
  if lowered in ("train", "training"):
    return "train"
  if lowered in ("test", "testing"):
    return "test"
  raise MedjaxError(f"unknown split {name!r}: expected train, val (valid/validate) or test")


def count_by(values) -> dict[Any, int]:
  out: dict[Any, int] = {}
  for value in values:
    out[value] = out.get(value, 0) + 1
  return out
