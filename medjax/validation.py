"""Checks of `config.json`-style dicts (model and scheduler configs) before anything is built.

A config value medjax does not implement must fail loudly, naming the key, instead of building a
model or scheduler that silently computes something else. A rule is `ANY`, a tuple of allowed
values, or a predicate `value -> bool` whose docstring says what it expects (the helpers below
build such predicates).
"""
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medjax.errors import MedjaxError

ANY = object()  # marker: any value is supported for this key

Rule = Any  # ANY | tuple of allowed values | predicate with a docstring


def rule(predicate: Callable[[Any], bool], expected: str) -> Callable[[Any], bool]:
  """`predicate` with `expected` as the text that error messages show."""
  def check(v):
    return bool(predicate(v))
  check.__doc__ = expected
  return check


def is_int(v: Any) -> bool:
  """an integer"""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """a number"""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_bool(v: Any) -> bool:
  """true or false"""
  return isinstance(v, bool)


def int_at_least(lo: int) -> Callable[[Any], bool]:
  return rule(lambda v: is_int(v) and v >= lo, f"an integer >= {lo}")


def positive_number(v: Any) -> bool:
  """a positive number"""
  return is_number(v) and v > 0


def optional(r: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return rule(lambda v: v is None or r(v), f"null or {describe(r)}")


def one_of(*values) -> Callable[[Any], bool]:
  """Exactly one of `values` (type included, so True is not 1)."""
  return rule(lambda v: any(type(v) is type(x) and v == x for x in values),
              "one of " + ", ".join(repr(x) for x in values))


def list_of(item: Rule, *, non_empty: bool = True) -> Callable[[Any], bool]:
  """A list/tuple whose items all pass `item` (a rule as above)."""
  def ok(v):
    return (isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty)
            and all(passes(item, x) for x in v))
  return rule(ok, f"a list of {describe(item)}")


def item_or_list(item: Rule) -> Callable[[Any], bool]:
  """One value passing `item`, or a list of such values."""
  as_list = list_of(item)
  return rule(lambda v: passes(item, v) or as_list(v),
              f"{describe(item)} or a list of them")


def passes(r: Rule, value: Any) -> bool:
  if r is ANY:
    return True
  if isinstance(r, tuple):
    return value in r
  return bool(r(value))


def describe(r: Rule) -> str:
  if r is ANY:
    return "any value"
  if isinstance(r, tuple):
    return " / ".join(repr(x) for x in r)
  return getattr(r, "__doc__", None) or "a supported value"


def check_config(config: Mapping[str, Any], supported: Mapping[str, Rule], source: str,
                 *, ignore: Callable[[str], bool] = lambda key: False) -> dict:
  """Returns `config` without private keys ('_class_name', ...) after checking every entry.

  Args:
    config: the loaded config.json.
    supported: key -> rule (ANY, a tuple of supported values, or a predicate `value -> bool`).
    source: the file (or description) named in error messages.
    ignore: keys for which this returns True are dropped unchecked (e.g. another class's options).

  Raises:
    MedjaxError naming the first unknown key or unsupported value.
  """
  out = {}
  for key, value in config.items():
    if key.startswith("_") or ignore(key):
      continue
    if key not in supported:
      raise MedjaxError(f"{source}: config key {key!r} (= {value!r}) is not supported by medjax")
    r = supported[key]
    if not passes(r, value):
      raise MedjaxError(f"{source}: config key {key!r} = {value!r} is not supported "
                        f"(expected {describe(r)})")
    out[key] = value
  return out


def check_known_keys(given, known, what: str) -> None:
  """One error naming every unknown key of `given` (an iterable of names) and the known ones."""
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise MedjaxError(f"{what}: unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
