"""configs/*.py: every config loads with each arg it documents, refuses any other arg in one line,
and its keys take overrides from the command line as ml_collections parses them."""
import importlib.util
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
from absl import flags
from ml_collections import config_flags

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
  if "stages" in config:  # medjax.reproduce configs (paper tables, the embedded recipe)
    from medjax import reproduce  # pylint: disable=g-import-not-at-top
    reproduce.check_config(config)
  elif name.startswith("eval_"):
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
  if "paper" not in _module(name).ARG.flags:  # the embedded recipe takes no arg at all
    message = re.escape(f"unknown arg '{arg.split(',')[0]}' in '{arg}'; accepted: no arg")
  with pytest.raises(MedjaxError, match=rf"configs/{name}\.py: {message}"):
    config_args.load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")


def _bad_setting_values():
  """(config, setting, value, message): a non-number for every setting, and values outside
  the setting's rule (vectors=0) where it has one."""
  out = []
  for name in CONFIGS:
    spec = _module(name).ARG
    for key, default in spec.settings.items():
      if isinstance(default, int):
        out.append((name, key, "many", "is not an int"))
      if key in spec.rules:
        out += [(name, key, v, f"is not {config_args.validation.describe(spec.rules[key])}")
                for v in ("0", "-3")]
  return out


@pytest.mark.parametrize("name,setting,value,message", _bad_setting_values())
def test_config_refuses_a_bad_setting_value(name, setting, value, message):
  arg = f"paper,{setting}={value}"
  with pytest.raises(MedjaxError) as e:
    config_args.load_config_file(f"{ROOT / 'configs' / name}.py:{arg}")
  assert str(e.value) == (f"{ROOT / 'configs' / name}.py: arg {setting}={value!r} in {arg!r} "
                          f"{message}; accepted: {_module(name).ARG.accepted()}")


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


def _parse_command_line(*args):
  """The config as `python -m medjax.train --config=... <args>` builds it (fresh flags)."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "a config file", flag_values=values)
  argv = ["train", *args]
  with mock.patch.object(sys, "argv", argv):  # config_flags reads the overrides from sys.argv
    values(argv)
  return values.config


def test_list_keys_take_tuples_from_the_command_line():
  config = _parse_command_line(
      "--config=configs/cxr_ti.py", "--config.sample.prompts=('a chest x-ray', 'a <lung>')",
      "--config.textual_inversion.tokens=(('<lung>', 'lung'),)",
      """--config.data.classes=(("pe", {"Pleural Effusion": 1}), ("no", {"No Finding": 1}))""",
      "--config.data.per_class_splits=val", "--config.data.pipeline.shuffle_splits=train",
      "--config.data.pipeline.shuffle_splits=val", "--config.data.mimic.views=()")
  assert config.sample.prompts == ("a chest x-ray", "a <lung>")
  assert config.textual_inversion.tokens == (("<lung>", "lung"),)
  assert config.data.classes == (("pe", {"Pleural Effusion": 1}), ("no", {"No Finding": 1}))
  assert config.data.per_class_splits == ("val",)  # one value: no tuple syntax needed
  assert config.data.pipeline.shuffle_splits == ("train", "val")  # a repeated flag
  assert config.data.mimic.views == ()
  train_config.check_train_config(config)
  with pytest.raises(flags.Error, match="as tuple"):  # the old ';' form is refused, not split
    _parse_command_line("--config=configs/cxr_unet.py", "--config.sample.prompts=a x-ray; b")
  config = _parse_command_line("--config=configs/eval_paper_a_mri.py",
                               "--config.model.embeddings=/runs/cspca.safetensors",
                               "--config.settings=('real', 'synthetic')")
  assert config.model.embeddings == ("/runs/cspca.safetensors",)
  assert config.settings == ("real", "synthetic")


def test_sweep_tuple_values_reach_the_config():
  """launch/sweep.py writes a tuple value as its repr; ml_collections reads it back as the tuple."""
  spec = importlib.util.spec_from_file_location("launch_sweep", ROOT / "launch" / "sweep.py")
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  runs = sweep.plan("/r", sweep.parse_grid("sample.prompts=('a x-ray', 'b; c'),('d',)"),
                    sweep.parse_sets(["data.classes=(('e', {'Pleural Effusion': 1}),)"]))
  for run, prompts in zip(runs, [("a x-ray", "b; c"), ("d",)], strict=True):
    args = [a for a in run.args("configs/cxr_unet.py") if not a.startswith("--workdir=")]
    config = _parse_command_line(*args)
    assert config.sample.prompts == prompts
    assert config.data.classes == (("e", {"Pleural Effusion": 1}),)


def test_documented_embedding_paths_are_the_written_ones():
  """Configs and README name embedding files where run_outputs.write_embeddings puts them."""
  texts = {f"configs/{n}.py": (ROOT / "configs" / f"{n}.py").read_text() for n in CONFIGS}
  texts["README.md"] = (ROOT / "README.md").read_text()
  for name, text in texts.items():
    assert "learned_embeds" not in text, f"{name}: names learned_embeds (not written by a run)"
    for path in re.findall(r"embeddings/[\w<>./-]*\.safetensors", text):
      assert re.match(r"embeddings/(diffusers|a1111)/[\w<>-]+\.safetensors$", path), (name, path)
