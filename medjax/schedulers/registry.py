"""Scheduler families by name: each family module registers its classes here on import.

`make_scheduler` finds a class by medjax name or by a config's diffusers `_class_name`, so a new
family is one module with `@register` classes, imported by the package.
"""
from collections.abc import Mapping
from typing import Any

from medjax import validation
from medjax.errors import MedjaxError
from medjax.schedulers import schedule
from medjax.schedulers.base import Scheduler

# medjax name -> family class.
REGISTRY: dict[str, type[Scheduler]] = {}
# The order names are listed in (command-line choices, error messages): simplest first, as in
# diffusers' docs. It does not depend on which family module happens to be imported first; a
# family registered outside it is listed after these.
LISTING_ORDER = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++")


def register(cls: type[Scheduler]) -> type[Scheduler]:
  """Class decorator: makes `cls` available under `cls.name`."""
  if cls.name in REGISTRY:
    raise ValueError(f"scheduler {cls.name!r} registered twice")
  unruled = [k for k in cls.defaults if k not in schedule.INERT_KEYS
             and k not in cls.rules and k not in schedule.SHARED_RULES]
  if unruled:
    raise ValueError(f"scheduler {cls.name!r}: no value rule for {', '.join(unruled)}")
  REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  listed = [n for n in LISTING_ORDER if n in REGISTRY]
  return tuple(listed + [n for n in REGISTRY if n not in LISTING_ORDER])


def class_names() -> dict[str, str]:
  """diffusers class name -> medjax scheduler name."""
  return {cls.class_name: name for name, cls in REGISTRY.items()}


def known_keys() -> frozenset[str]:
  """Keys any of the registered classes reads."""
  return frozenset(k for cls in REGISTRY.values() for k in cls.defaults)


def lookup(name: str) -> type[Scheduler]:
  """The family class registered as `name`; a one-line error naming the known ones."""
  if name not in REGISTRY:
    raise MedjaxError(f"scheduler name {name!r} is not supported; expected one of "
                      f"{', '.join(names())}")
  return REGISTRY[name]


def resolve_config(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """The diffusers class defaults updated with `config`, after checking every key and value.

  Raises:
    MedjaxError naming the unknown keys or the first unsupported value.
  """
  return lookup(name).resolve(config, known_keys())


def make_scheduler(name: str | None, config: Mapping[str, Any], *, eta: float = 0.0) -> Scheduler:
  """A scheduler from a pipeline's scheduler/scheduler_config.json dict.

  Args:
    name: a registered name (`NAMES`), or None for the config's `_class_name`. Keys of the other
      supported classes are ignored (as diffusers' `from_config`), so any SD config builds any
      scheduler.
    config: the scheduler config dict.
    eta: DDIM's eta (DDIM only).

  Raises:
    MedjaxError for an unknown name or class, an unknown key or an unsupported value.
  """
  if name is None:
    cls_name = config.get("_class_name")
    by_class = class_names()
    if cls_name not in by_class:
      raise MedjaxError(f"scheduler config: '_class_name' = {cls_name!r} is not supported; "
                        f"expected one of {', '.join(by_class)} (or pass a scheduler name)")
    name = by_class[cls_name]
  cls = lookup(name)
  if not validation.is_number(eta) or eta < 0 or (eta and not cls.takes_eta):
    raise MedjaxError(f"eta = {eta!r}; expected a number >= 0, and 0 for schedulers other "
                      "than 'ddim'")
  resolved = cls.resolve(config, known_keys())
  return cls(options=tuple(sorted(resolved.items())), eta=float(eta))
