"""Validation of diffusers/transformers `config.json` dicts before a module is built.

A config value medjax does not implement must fail loudly, naming the key, instead of building a
model that silently computes something else.
"""
from typing import Any, Callable, Mapping

from medjax.errors import MedjaxError

ANY = object()  # marker: any value is supported for this key


def check_config(config: Mapping[str, Any], supported: Mapping[str, Any], source: str) -> dict:
  """Returns `config` without private keys ('_class_name', ...) after checking every entry.

  Args:
    config: the loaded config.json.
    supported: key -> ANY, a tuple of supported values, or a predicate `value -> bool`.
    source: the file (or description) named in error messages.

  Raises:
    MedjaxError naming the first unknown key or unsupported value.
  """
  out = {}
  for key, value in config.items():
    if key.startswith("_"):
      continue
    if key not in supported:
      raise MedjaxError(f"{source}: config key {key!r} (= {value!r}) is not supported by medjax")
    rule = supported[key]
    ok = (rule is ANY or (callable(rule) and rule(value))
          or (isinstance(rule, tuple) and value in rule))
    if not ok:
      expected = rule if isinstance(rule, tuple) else getattr(rule, "__doc__", None) or "a supported value"
      raise MedjaxError(f"{source}: config key {key!r} = {value!r} is not supported "
                        f"(expected {expected})")
    out[key] = value
  return out


def one_of(*values) -> Callable[[Any], bool]:
  return lambda v: v in values
