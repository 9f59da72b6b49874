"""The `arg` of `configs/<name>.py:get_config(arg)`, parsed one way for every config file.

`--config=configs/cxr_ti.py:paper,vectors=8` hands `get_config` the text after the colon: a
comma-separated list of flags (`paper`) and `key=value` settings (`vectors=8`). Each config file
declares what it accepts in an `ArgSpec`; anything else is one error naming the file, the arg and
the accepted options, instead of a config silently built without it.

This lives in `medjax` (not `configs/`) because ml_collections loads a config file by its path,
so config files cannot import each other.
"""
import dataclasses
import importlib.util
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medjax import validation
from medjax.errors import MedjaxError


@dataclasses.dataclass(frozen=True)
class ArgSpec:
  """What one config file accepts: on/off `flags` and `settings` (name -> default value, whose
  type is the type a given value must parse to), and `rules` a parsed setting must pass
  (name -> a `validation` rule, e.g. `int_at_least(1)`)."""
  flags: tuple[str, ...] = ()
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  rules: Mapping[str, validation.Rule] = dataclasses.field(default_factory=dict)

  def accepted(self) -> str:
    shown = list(self.flags) + [f"{k}=<{type(v).__name__}>" for k, v in self.settings.items()]
    return ", ".join(shown) or "no arg"

  def parse(self, arg: str | None, config_file: str) -> types.SimpleNamespace:
    """`'paper,vectors=8'` -> namespace(paper=True, vectors=8); absent options get defaults.

    Raises:
      MedjaxError naming `config_file`, the arg and the accepted options for an unknown option,
      a flag given a value, a setting given none, or a value of the wrong type.
    """
    out = {name: False for name in self.flags} | dict(self.settings)
    for part in (p.strip() for p in (arg or "").split(",")):
      if not part:
        continue
      name, eq, value = (s.strip() for s in part.partition("="))
      if name in self.flags and not eq:
        out[name] = True
      elif name in self.settings and eq and value:
        out[name] = self._value(name, value, arg, config_file)
      else:
        raise MedjaxError(f"{config_file}: unknown arg {part!r} in {arg!r}; accepted: "
                          f"{self.accepted()}")
    return types.SimpleNamespace(**out)

  def _value(self, name: str, text: str, arg: str, config_file: str) -> Any:
    kind = type(self.settings[name])
    try:
      value = kind(text)
    except ValueError:
      raise MedjaxError(f"{config_file}: arg {name}={text!r} in {arg!r} is not "
                        f"{'an' if kind is int else 'a'} {kind.__name__}; accepted: "
                        f"{self.accepted()}") from None
    rule = self.rules.get(name, validation.ANY)
    if not validation.passes(rule, value):
      raise MedjaxError(f"{config_file}: arg {name}={text!r} in {arg!r} is not "
                        f"{validation.describe(rule)}; accepted: {self.accepted()}")
    return value


def load_config_module(path) -> types.ModuleType:
  """A config file as ml_collections loads it: by its path, not as part of a package."""
  module_spec = importlib.util.spec_from_file_location(f"{Path(path).stem}_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str):
  """What `--config=path.py[:arg]` gives: `get_config(arg)` of the file, the text after the
  first colon as its one argument (as ml_collections passes it)."""
  path, *arg = str(spec).split(":", 1)
  return load_config_module(path).get_config(*arg)
