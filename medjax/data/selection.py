"""Class definitions over labels, and the per-class selection of paper A (N images per class).

A class is a name and a conjunction of label conditions, `('name', {'Label': 1, 'Other': 0})`;
classes are a tuple of them, e.g. (('pleural_effusion', {'Pleural Effusion': 1}),
('no_finding', {'No Finding': 1})).
A record belongs to the first class whose conditions its labels meet (an unknown/ignored label
meets none); records of no class are dropped when classes are configured.
"""
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medjax.data.records import Record
from medjax.errors import MedjaxError

ClassSpec = list[tuple[str, list[tuple[str, float]]]]


def _conditions(name: str, conditions: Any) -> list[tuple[str, float]]:
  if not isinstance(conditions, Mapping) or not conditions:
    raise MedjaxError(f"config.data.classes: class {name!r} needs its conditions as "
                      f"{{'Label': 1 or 0, ...}}, got {conditions!r}")
  out = []
  for label, value in conditions.items():
    if isinstance(value, bool) or value not in (0, 1):
      raise MedjaxError(f"config.data.classes: class {name!r} condition {label!r}: "
                        f"{value!r} should be 1 or 0")
    out.append((str(label), float(value)))
  return out


def parse_classes(spec: Any) -> ClassSpec:
  """(('a', {'L': 1}), ('b', {'M': 1})) or {'a': {'L': 1}, ...} -> [('a', [('L', 1.0)]), ...]."""
  if not spec:
    return []
  if isinstance(spec, str):
    raise MedjaxError(f"config.data.classes={spec!r}: give (name, {{'Label': 1 or 0}}) pairs, "
                      "e.g. (('effusion', {'Pleural Effusion': 1}), ('none', {'No Finding': 1}))")
  items = list(spec.items()) if isinstance(spec, Mapping) else list(spec)
  for item in items:
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
      raise MedjaxError(f"config.data.classes: {item!r} should be a (name, {{'Label': 1}}) pair")
  names = [name for name, _ in items]
  if len(set(names)) != len(names):
    raise MedjaxError(f"config.data.classes: duplicate class names in {names}")
  return [(name, _conditions(name, conditions)) for name, conditions in items]


def assign_classes(records: Sequence[Record], classes: ClassSpec,
                   label_names: Sequence[str]) -> list[Record]:
  """Sets `class_index` on matching records and drops the rest (no-op without classes)."""
  if not classes:
    return list(records)
  for name, conditions in classes:
    for label, _ in conditions:
      if label not in label_names:
        raise MedjaxError(f"config.data.classes: class {name!r} uses unknown label {label!r}; "
                          f"this dataset has {list(label_names)}")
  out = []
  for record in records:
    for index, (_, conditions) in enumerate(classes):
      if all(record.labels.get(label) == value for label, value in conditions):
        out.append(dataclasses.replace(record, class_index=index))
        break
  return out


def per_class(records: Sequence[Record], count: int, seed: int, class_names: Sequence[str],
              where: str) -> list[Record]:
  """A seeded choice of exactly `count` records per class, in a stable order.

  Raises:
    MedjaxError if a class has fewer than `count` records.
  """
  if count < 0:
    raise MedjaxError(f"config.data.per_class={count}: expected >= 0 (0 = all)")
  if count == 0:
    return list(records)
  groups: dict[int, list[Record]] = {}
  for record in sorted(records, key=lambda r: r.key):
    groups.setdefault(record.class_index, []).append(record)
  out = []
  for index in sorted(groups):
    group = groups[index]
    name = class_names[index] if 0 <= index < len(class_names) else "(all)"
    if len(group) < count:
      raise MedjaxError(f"{where}: class {name!r} has {len(group)} images, fewer than "
                        f"per_class={count}")
    order = np.random.default_rng(seed).permutation(len(group))[:count]
    out.extend(group[i] for i in sorted(order))
  if classes_missing := [n for i, n in enumerate(class_names) if i not in groups]:
    raise MedjaxError(f"{where}: no images of class(es) {classes_missing}")
  return out


def keep_classes(records: Sequence[Record], names: Sequence[str],
                 class_names: Sequence[str]) -> list[Record]:
  """The records of the classes named in `config.data.keep_classes` (all when empty)."""
  if not names:
    return list(records)
  if isinstance(names, str) or any(n not in class_names for n in names):
    raise MedjaxError(f"config.data.keep_classes={names!r}: expected a tuple of names from "
                      f"config.data.classes {list(class_names)}")
  keep = {class_names.index(n) for n in names}
  return [r for r in records if r.class_index in keep]


def class_counts(records: Sequence[Record], class_names: Sequence[str]) -> Mapping[str, int]:
  counts: dict[str, int] = {}
  for record in records:
    name = class_names[record.class_index] if record.class_index >= 0 else "(all)"
    counts[name] = counts.get(name, 0) + 1
  return counts
