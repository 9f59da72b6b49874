r"""python -m medjax.reproduce --config=configs/paper_a_mri.py[:paper] --workdir=DIR

One command per paper table. Runs every stage the table needs, in order, each in DIR/<stage>:
the generator's trainings (one run per textual-inversion token, each with the paper's steps),
then the evaluations; then writes DIR/results.md and DIR/results.json: our numbers beside the
paper's, and the evaluation reports (with their settings tables: which settings are the paper's
and which are ours).

Every stage reads one split file, DIR/split.json (`config.data.split.file`), written by the
first stage to read data: the generators train only on patients of the evaluation's train split,
and the evaluation checks that (`medjax.eval.leakage`). A finished stage is skipped when the
command runs again (its settings must be unchanged); an interrupted training resumes from its
checkpoints. Overrides: `--config.data.root=...`, `--config.model.pretrained=...`,
`--config.fid.weights=...` apply to every stage; `--config.stages.<stage>.config.<key>=...` to
one.
"""
import json
import sys
from typing import Any

import ml_collections
from absl import flags
from absl import logging
from etils import epath

from medjax import atomic
from medjax import cli
from medjax import distributed
from medjax import embedded_recipe
from medjax import hosts
from medjax import paper_tables
from medjax import paths
from medjax import trainer
from medjax.errors import MedjaxError
from medjax.eval import ablation
from medjax.eval import privacy_report
from medjax.eval import protocols
from medjax.train_config import check_train_config
from medjax.train_config import config_diff

KINDS = ("train", "evaluate", "export")
# config.data blocks that describe the dataset and its split: the same in every stage. Classes,
# prompts, per-class counts and augmentation stay each stage's own.
SHARED_DATA = ("source", "root", "on_bad_file", "max_bad_fraction", "check_files", "phantoms",
               "chexpert", "mimic", "picai", "folder", "split")


# -- configs ----------------------------------------------------------------------------------

def stage_config(config: Any, name: str, workdir: epath.Path,
                 inputs: bool = True) -> ml_collections.ConfigDict:
  """The full config of stage `name`: its file, the shared settings, its overrides, and (with
  `inputs`, once the stages before it ran) the files of the stages it needs."""
  s = config.stages[name]
  if s.kind not in KINDS:
    raise MedjaxError(f"config.stages.{name}.kind={s.kind!r}: expected one of {KINDS}")
  for dep in (s.train_workdir, s.pretrained, s.source, *s.embeddings, *s.generator_workdirs):
    if dep and dep not in config.order[:list(config.order).index(name)]:
      raise MedjaxError(f"config.stages.{name} needs stage {dep!r}, which does not run "
                        f"before it in config.order={tuple(config.order)}")
  if s.kind == "export":
    return embedded_recipe.export_config(workdir / s.source, s.fit_scaling_factor)
  c = ml_collections.ConfigDict(s.config.to_dict())  # a copy, unlocked
  if not s.own_data:
    for key in SHARED_DATA:
      c.data[key] = ml_collections.ConfigDict(config.data[key].to_dict()) if isinstance(
          config.data[key], ml_collections.ConfigDict) else config.data[key]
    if not c.data.split.file:
      c.data.split.file = str(workdir / "split.json")
  c.model.pretrained, c.model.allow_pickle = config.model.pretrained, config.model.allow_pickle
  if s.pretrained:
    c.model.pretrained = str(workdir / s.pretrained)
  if s.kind == "evaluate":
    c.fid.weights, c.fid.allow_pickle = config.fid.weights, config.fid.allow_pickle
    files = []
    for dep in s.embeddings if inputs else ():
      found = sorted((workdir / dep / "embeddings" / "diffusers").glob("*.safetensors"))
      if not found:
        raise MedjaxError(f"stage {name}: stage {dep} wrote no embeddings in {workdir / dep}")
      files += [str(f) for f in found]
    c.model.embeddings = tuple(files)
    if s.train_workdir:
      c.model.train_workdir = str(workdir / s.train_workdir)
    c.model.generator_workdirs = tuple(str(workdir / d) for d in s.generator_workdirs)
  if s.kind == "train":
    check_train_config(c)
  else:
    check_train_config(c, protocols.base_config(), free_maps=protocols.FREE_MAPS)
  return c


# -- running ----------------------------------------------------------------------------------

def _changed(kind: str, saved: dict, now: ml_collections.ConfigDict) -> list[str]:
  """The keys of a stage's config that differ from those it finished with (progress bars
  aside)."""
  defaults = None if kind == "train" else json.loads(protocols.base_config().to_json())
  changed = config_diff(saved, json.loads(now.to_json()), defaults=defaults)
  return [k for k in changed if k.split(".")[-1] not in ("progress_bar", "progress")]


def is_done(kind: str, stage_dir: epath.Path, config: ml_collections.ConfigDict) -> bool:
  """A stage finished with these settings (an error if it finished with others)."""
  if kind == "train":
    summary = stage_dir / "summary.json"
    done = summary.exists() and json.loads(summary.read_text()).get("step") == config.total_steps
  elif kind == "export":
    return embedded_recipe.export_done(config, stage_dir)
  else:
    done = (stage_dir / "results.json").exists()
  if not done:
    return False
  changed = _changed(kind, json.loads((stage_dir / "config.json").read_text()), config)
  if changed:
    raise MedjaxError(f"{stage_dir} finished with other settings ({', '.join(changed[:5])}); "
                      "remove that folder to run it again, or use another --workdir")
  return True


def run_stage(kind: str, config: ml_collections.ConfigDict, stage_dir: epath.Path) -> None:
  if kind == "train":
    trainer.train(config, stage_dir)
  elif kind == "export":
    embedded_recipe.export_stage(config, stage_dir)
  else:
    protocols.run_protocol(config, stage_dir)


def check_config(config: Any, workdir="/tmp/medjax_reproduce") -> None:
  """Unknown keys, stage names and every stage's full config, before the first stage runs."""
  base = paper_tables.base_config(config.table, config.title, config.data)
  check_train_config(config, base, free_maps=("stages", "paper"))  # stages: checked below
  unknown = [n for n in config.order if n not in config.stages]
  if unknown or not config.order:
    raise MedjaxError(f"config.order={tuple(config.order)}: expected stage names from "
                      f"{list(config.stages)}")
  for name in config.order:
    stage_config(config, name, paths.workdir_path(workdir), inputs=False)


def reproduce(config: Any, workdir) -> dict:
  """Runs every stage not yet done, then writes the table; returns results.json's dict."""
  workdir = paths.workdir_path(workdir)
  check_config(config, workdir)
  if config.table == "embedded":
    embedded_recipe.git_commit()  # the commit the stages run from, for the packaged file
  done = []
  for i, name in enumerate(config.order):
    kind, stage_dir = config.stages[name].kind, workdir / name
    stage_cfg = stage_config(config, name, workdir)
    if is_done(kind, stage_dir, stage_cfg):
      logging.info("reproduce: stage %s is done (%s)", name, stage_dir)
      done.append(name)
      continue
    logging.info("reproduce: stage %d/%d: %s %s", i + 1, len(config.order), kind, name)
    print(f"medjax.reproduce: stage {i + 1}/{len(config.order)}: {kind} {name} -> {stage_dir}",
          file=sys.stderr, flush=True)
    run_stage(kind, stage_cfg, stage_dir)
  results = write_table(config, workdir)
  results["skipped_done_stages"] = done
  return results


# -- the table --------------------------------------------------------------------------------

def _results(workdir: epath.Path, name: str) -> dict:
  path = workdir / name / "results.json"
  if not path.exists():
    raise MedjaxError(f"{path}: missing; stage {name} did not finish")
  return json.loads(path.read_text())


def _evaluations(config: Any) -> list[str]:
  return [n for n in config.order if config.stages[n].kind == "evaluate"]


def _paper(config: Any, row: str) -> str:
  return str(config.paper[row]) if row in config.paper else "not reported"


def paper_a_rows(config: Any, results: dict) -> list[list[str]]:
  rows = [["training set", "AUC ours (mean ± std)", "AUC paper"]]
  for setting, s in results["summary_auc"].items():
    rows.append([setting, f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})",
                 _paper(config, setting)])
  fid = results["fid"]
  rows.append([f"FID vs {fid['reference']}", f"{fid['all']:.2f}", _paper(config, "fid")])
  return rows


def paper_b_rows(config: Any, evaluations: list[str], workdir: epath.Path) -> list[list[str]]:
  rows = [["generator (stage)", "classifier AUC on generated", "accuracy on generated",
           "paper"]]
  for name in evaluations:
    g = _results(workdir, name)["classifier_on_generated"]
    rows.append([name, f"{g['auc']:.3f}", f"{g['accuracy']:.3f}", _paper(config, name)])
  return rows


def privacy_summary(workdir: epath.Path, evaluations: list[str]) -> dict:
  """{stage: its privacy audit's counts} for each evaluation stage whose audit ran
  (eval/privacy_report.py)."""
  keys = ("flagged", "num_generated", "fraction_flagged", "heldout_flag_rate",
          "false_positive_bound", "train_images", "heldout_split")
  out = {}
  for name in evaluations:
    p = _results(workdir, name).get("privacy")
    if p:
      out[name] = {k: p[k] for k in keys}
      out[name]["calibrated_on"] = privacy_report.calibration(p)
  return out


def privacy_lines(summary: dict) -> list[str]:
  """The results.md section of `privacy_summary`: one row per audited stage."""
  if not summary:
    return []
  lines = ["## Privacy audit (ours: generated near-copies of training images)", "",
           "| evaluation stage | flagged generated images | held-out flagged | "
           "false-positive bound | audited against | calibrated on |",
           "|---|---|---|---|---|---|"]
  for name, p in summary.items():
    lines.append(f"| {name} | {p['flagged']} / {p['num_generated']} "
                 f"({p['fraction_flagged']:.1%}) | {p['heldout_flag_rate']:.1%} | "
                 f"{p['false_positive_bound']:.1%} | {p['train_images']} | {p['calibrated_on']} |")
  return lines + [""]


def write_table(config: Any, workdir: epath.Path) -> dict:
  """DIR/results.md and results.json from the stages' results (process 0 writes)."""
  evaluations = _evaluations(config)
  out = {"table": config.table, "title": config.title, "notes": list(config.notes),
         "stages": {n: str(workdir / n) for n in config.order},
         "split_file": str(workdir / "split.json")}
  lines = [f"# {config.title}", "", "Stages: " + ", ".join(
      f"{n} ({config.stages[n].kind})" for n in config.order), ""]
  lines += [f"> {n}" for n in config.notes] + ([""] if config.notes else [])
  if config.table == "ablation":
    values = list(config.ablation.swept_values)
    rows = [(v, _results(workdir, n)) for v, n in zip(values, config.ablation.evaluations,
                                                                 strict=True)]
    if hosts.is_lead():
      table = ablation.gather(rows, config.ablation.swept, workdir)
    else:
      table = []
    out["ablation"] = {"swept": config.ablation.swept, "values": values}
    lines += ["See ablation.md and ablation.png.", ""]
    out["rows"] = table
  elif config.table == "paper_a":
    results = _results(workdir, evaluations[-1])
    out["rows"] = paper_a_rows(config, results)
  elif config.table == "paper_b":
    out["rows"] = paper_b_rows(config, evaluations, workdir)
  elif config.table == "embedded":
    out["rows"], out["targets_met"] = embedded_recipe.rows(
        {n: _results(workdir, n) for n in evaluations})
    lines += [f"All targets met: {'yes' if out['targets_met'] else 'NO'}.", ""]
    model = [n for n in config.order if config.stages[n].kind == "export"][-1]
    out["weights"] = str(workdir / "embedded_tiny_sd.safetensors")
    if hosts.is_lead():
      embedded_recipe.package(workdir / model, epath.Path(out["weights"]), out["rows"])
  else:
    raise MedjaxError(f"config.table={config.table!r}: expected 'paper_a', 'paper_b', "
                      "'ablation' or 'embedded'")
  if config.table != "ablation":
    head, *body = out["rows"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body] + [""]
  out["privacy"] = privacy_summary(workdir, evaluations)
  lines += privacy_lines(out["privacy"])
  for name in evaluations:
    report = workdir / name / "results.md"
    if report.exists():
      demoted = ("\n" + report.read_text()).replace("\n# ", "\n### ").strip()
      lines += [f"## Stage {name}", "", demoted, ""]
  if hosts.is_lead():
    atomic.write_text(workdir / "results.json", json.dumps(out, indent=1, default=str) + "\n")
    atomic.write_text(workdir / "results.md", "\n".join(lines) + "\n")
  return out


# -- entry point ------------------------------------------------------------------------------

def define_flags():
  cli.define_config_and_workdir("A reproduce config: configs/paper_<name>.py[:arg].",
                                "Where every stage, the split file and the table go.")


def main(argv):
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  distributed.maybe_initialize_distributed()
  reproduce(flags.FLAGS.config, flags.FLAGS.workdir)
  if hosts.is_lead():
    print((paths.workdir_path(flags.FLAGS.workdir) / "results.md").read_text())


def run():
  cli.run_with_config(main, define_flags)


if __name__ == "__main__":
  run()
