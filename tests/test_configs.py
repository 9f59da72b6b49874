"""configs/*.py: every config loads with each arg it documents, refuses any other arg in one line,
and its keys take overrides from the command line as ml_collections parses them."""
from pathlib import Path

import pytest

from medjax import config_args
from medjax import train_config
from medjax.errors import MedjaxError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
EVAL_FREE_MAPS = train_config.FREE_MAPS + ("generation.prompts",)


def _module(name):
  return config_args.load_config_module(ROOT / "configs" / f"{name}.py")


def _documented_args(name):
  """'', each flag alone, each setting at another value, and every option at once."""
  spec = _module(name).ARG
  settings = [f"{k}={v + 1 if isinstance(v, int) else v}" for k, v in spec.settings.items()]
  return ["", *spec.flags, *settings, ",".join([*spec.flags, *settings])]


def _check(name, config):
  if name.startswith("eval_"):
    from medjax.eval import protocols  # pylint: disable=g-import-not-at-top
    train_config.check_train_config(config, protocols.base_config(), free_maps=EVAL_FREE_MAPS)
  else:
    train_config.check_train_config(config)


def test_every_config_declares_its_args():
  assert CONFIGS and all(isinstance(_module(n).ARG, config_args.ArgSpec) for n in CONFIGS)


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in _documented_args(n)])
def test_config_loads_with_each_documented_arg(name, arg):
  module = _module(name)
  for option in [*module.ARG.flags, *module.ARG.settings]:
    assert option in module.__doc__, f"configs/{name}.py: arg option {option!r} is undocumented"
  config = config_args.load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")
  _check(name, config)
  if "paper" in arg.split(","):
    assert config != module.get_config()
  if "vectors=" in arg:
    assert config.textual_inversion.num_vectors == module.ARG.settings["vectors"] + 1


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg,message", [
    ("bogus", "unknown arg 'bogus' in 'bogus'; accepted: paper"),
    ("paper,bogus=1", "unknown arg 'bogus=1' in 'paper,bogus=1'; accepted: paper"),
    ("paper=1", "unknown arg 'paper=1'"),
])
def test_config_refuses_an_unknown_arg(name, arg, message):
  with pytest.raises(MedjaxError, match=rf"configs/{name}\.py: {message}"):
    config_args.load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")


def test_arg_spec_values():
  spec = config_args.ArgSpec(flags=("paper",), settings={"vectors": 64, "name": "x"})
  opts = spec.parse(" paper , vectors=8,name=y", "c.py")
  assert (opts.paper, opts.vectors, opts.name) == (True, 8, "y")
  assert vars(spec.parse(None, "c.py")) == {"paper": False, "vectors": 64, "name": "x"}
  assert spec.accepted() == "paper, vectors=<int>, name=<str>"
  with pytest.raises(MedjaxError, match=r"c.py: arg vectors='many' in 'vectors=many' is not an "
                     r"int; accepted: paper, vectors=<int>, name=<str>"):
    spec.parse("vectors=many", "c.py")
  with pytest.raises(MedjaxError, match="unknown arg 'vectors' in 'vectors'"):
    spec.parse("vectors", "c.py")
  with pytest.raises(MedjaxError, match="c.py: unknown arg 'x' in 'x'; accepted: no arg"):
    config_args.ArgSpec().parse("x", "c.py")
