"""Patient-level train/val/test splits: no patient ever appears in two splits.

Splits depend only on the records and `split.seed`, never on the training seed, so a fixed test
set stays fixed across runs. Modes:
  source     the dataset's own split (CheXpert train/valid.csv, MIMIC split file). A download
             without a test split (CheXpert-v1.0-small) takes `source_test='val'`: the
             source's val split is the test split, and val is a seeded patient-level
             `source_val_fraction` of the source's train split.
  random     whole patients by `fractions` of images, e.g. (0.8, 0.1, 0.1)
  sizes      exactly `sizes` images per split (paper A: 200/200/200), balanced over classes
"""
from collections.abc import Sequence

import numpy as np

from medjax.data.records import Record
from medjax.errors import MedjaxError

SPLITS = ("train", "val", "test")


def check_split(split: str) -> int:
  if split not in SPLITS:
    raise MedjaxError(f"split={split!r}: expected one of {list(SPLITS)}")
  return SPLITS.index(split)


def _patients(records: Sequence[Record], seed: int) -> list[list[Record]]:
  by_patient: dict[str, list[Record]] = {}
  for record in sorted(records, key=lambda r: r.key):
    by_patient.setdefault(record.patient_id, []).append(record)
  names = sorted(by_patient)
  order = np.random.default_rng(seed).permutation(len(names))
  return [by_patient[names[i]] for i in order]


def split_by_fractions(records: Sequence[Record], split: str, fractions: Sequence[float],
                       seed: int) -> list[Record]:
  """Assigns shuffled patients to splits until each split holds its fraction of the images."""
  index = check_split(split)
  fractions = [float(f) for f in fractions]
  if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) > 1.0 + 1e-6:
    raise MedjaxError(f"config.data.split.fractions={tuple(fractions)}: expected three "
                      f"non-negative (train, val, test) fractions summing to at most 1")
  bounds = np.cumsum(fractions) * len(records)
  out, seen = [], 0
  for patient in _patients(records, seed):
    position = seen + len(patient) / 2.0  # a patient goes where its middle image falls
    seen += len(patient)
    target = int(np.searchsorted(bounds, position, side="right"))
    if target == index:
      out.extend(patient)
  return out


def split_by_sizes(records: Sequence[Record], split: str, sizes: Sequence[int], seed: int,
                   class_names: Sequence[str]) -> list[Record]:
  """Fills train, then val, then test with whole patients up to exact per-class quotas.

  Each split's size is divided evenly over the classes (paper A: 200 = 100 + 100). A patient's
  images beyond a quota are left unused rather than leaked into another split.
  """
  index = check_split(split)
  sizes = [int(s) for s in sizes]
  if len(sizes) != 3 or min(sizes) < 0:
    raise MedjaxError(f"config.data.split.sizes={tuple(sizes)}: expected three (train, val, "
                      f"test) image counts")
  classes = list(range(len(class_names))) if class_names else [-1]
  quotas = [{c: size // len(classes) + (i < size % len(classes)) for i, c in enumerate(classes)}
            for size in sizes]
  wanted = [dict(q) for q in quotas]
  chosen: list[list[Record]] = [[], [], []]
  for patient in _patients(records, seed):
    by_class: dict[int, list[Record]] = {}
    for record in patient:
      by_class.setdefault(record.class_index, []).append(record)
    for s, quota in enumerate(quotas):
      if any(quota.get(c, 0) > 0 for c in by_class):
        for c, group in by_class.items():
          take = min(quota.get(c, 0), len(group))
          chosen[s].extend(group[:take])
          if c in quota:
            quota[c] -= take
        break
  short = {c: quota for c, quota in quotas[index].items() if quota > 0}
  if short:
    detail = ", ".join(
        f"{class_names[c] if c >= 0 else 'images'}: {wanted[index][c] - n} of {wanted[index][c]}"
        for c, n in short.items())
    raise MedjaxError(f"split {split!r} with sizes={tuple(sizes)}: not enough patients left "
                      f"({detail})")
  return chosen[index]


def split_by_source(records: Sequence[Record], split: str, source_test: str = "",
                    val_fraction: float = 0.1, seed: int = 0) -> list[Record]:
  """Mode 'source': the dataset's own splits, or with `source_test='val'` its val split as test
  and val drawn by whole patients from its train split. Every patient stays in one split."""
  if not any(r.source_split for r in records):
    raise MedjaxError("config.data.split.mode='source', but this dataset defines no splits; "
                      "use 'random' or 'sizes'")
  where: dict[str, str] = {}
  for r in records:
    if r.source_split and where.setdefault(r.patient_id, r.source_split) != r.source_split:
      raise MedjaxError(f"config.data.split.mode='source': patient {r.patient_id!r} is in the "
                        f"dataset's {where[r.patient_id]!r} and {r.source_split!r} splits; "
                        "use mode 'random' or 'sizes' (patient-level)")
  if source_test == "":
    if split == "test" and not any(r.source_split == "test" for r in records):
      raise MedjaxError("config.data.split.mode='source': this dataset has no test split "
                        "(e.g. CheXpert-v1.0-small has train.csv and valid.csv only); set "
                        "config.data.split.source_test='val' to test on its val split")
    return [r for r in records if r.source_split == split]
  if source_test != "val":
    raise MedjaxError(f"config.data.split.source_test={source_test!r}: expected '' (the "
                      "dataset's own test split) or 'val' (its val split as test)")
  if split == "test":
    return [r for r in records if r.source_split == "val"]
  val_fraction = float(val_fraction)
  if not 0 < val_fraction < 1:
    raise MedjaxError(f"config.data.split.source_val_fraction={val_fraction}: expected a "
                      "fraction in (0, 1) of the source's train split")
  train = [r for r in records if r.source_split == "train"]
  return split_by_fractions(train, split, (1 - val_fraction, val_fraction, 0.0), seed)


def split_records(records: Sequence[Record], split: str, *, mode: str = "random",
                  fractions: Sequence[float] = (0.8, 0.1, 0.1), sizes: Sequence[int] = (),
                  seed: int = 0, class_names: Sequence[str] = (), source_test: str = "",
                  source_val_fraction: float = 0.1) -> list[Record]:
  """The records of `split` under `mode` ('source', 'random' or 'sizes')."""
  check_split(split)
  if mode == "source":
    return split_by_source(records, split, source_test, source_val_fraction, seed)
  if mode == "random":
    return split_by_fractions(records, split, fractions, seed)
  if mode == "sizes":
    return split_by_sizes(records, split, sizes, seed, class_names)
  raise MedjaxError(f"config.data.split.mode={mode!r}: expected 'source', 'random' or 'sizes'")
