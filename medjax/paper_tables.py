"""The stages of each paper table, for `python -m medjax.reproduce` (configs/paper_*.py).

Paper A (de Wilde et al.): one textual-inversion run per class token, each on that class's
images of the evaluation's real train split (100 per class at paper scale) with the paper's
steps (50k CXR, 100k MRI), then the AUC evaluation with the learned tokens. Its ablations rerun
both with another number of vectors per token or images per class.
Paper B (Chambon et al.): the evaluation of the base model (VAE table, classifier on generated
images), then U-Net fine-tuning without and with prior preservation, each evaluated.
"""
from pathlib import Path

import ml_collections

from medjax import config_args
from medjax import validation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The papers' numbers (../shared/papers/NOTES.md) printed beside ours.
PAPER_A_MRI = {"real": "0.780 ± 0.017", "real+synthetic": "0.803 ± 0.009",
               "synthetic": "0.766"}
PAPER_B = {"evaluate_finetune": "~0.98 AUC, ~95% accuracy (pleural effusion, their best "
                                "fine-tuned U-Net)"}
ABLATIONS = {  # name -> (swept, paper's values, embedded default's values, TI config key)
    "vectors": ("vectors per token", (1, 8, 16, 64), (1, 8, 16, 64),
                "textual_inversion.num_vectors"),
    "images": ("images per class", (10, 50, 100), (3, 6, 12), "data.per_class"),
}


# configs/paper_a_{mri,cxr}.py's arg.
PAPER_A_ARG = config_args.ArgSpec(
    flags=("paper",), settings={"ablation": "none"},
    rules={"ablation": validation.one_of("none", *ABLATIONS)})


def paper_a_config(modality: str, arg: str, config_file: str) -> ml_collections.ConfigDict:
  """configs/paper_a_<modality>.py:`arg`."""
  opts = PAPER_A_ARG.parse(arg, config_file)
  return paper_a(modality, opts.paper, "" if opts.ablation == "none" else opts.ablation)


def stage(kind: str, file: str = "", arg: str = "", **needs) -> ml_collections.ConfigDict:
  """One stage: a `kind` run of configs/`file`:`arg` (a name in configs/ or a path).

  The stage holds that file's whole config as `config`, so `--config.stages.<stage>.config.<key>`
  overrides any of its keys from the command line (with ml_collections' type checks).
  needs: embeddings=(train stages whose embedding files the generator loads),
    train_workdir='<train stage>' (the fine-tuned generator to evaluate),
    pretrained='<export stage>' (its diffusers directory is this stage's base model),
    generator_workdirs=(train stages behind that model, for the leakage check),
    own_data=True (this stage reads its own dataset, not the table's shared one),
    changes={'dotted.key': value} (set on the loaded config).
  An 'export' stage (no file) writes a train stage's model as a diffusers directory:
    source='<train stage>', fit_scaling_factor=N (refit the VAE's latent scale on N images of
    its train split; 0 keeps it).
  """
  s = ml_collections.ConfigDict()
  s.kind = kind
  s.file = str(CONFIGS / file) if file else ""  # an absolute path stays as it is
  s.arg = arg
  s.config = (config_args.load_config_file(f"{s.file}:{arg}" if arg else s.file) if file
              else ml_collections.ConfigDict())
  set_keys(s.config, needs.get("changes", {}))
  s.embeddings = tuple(needs.get("embeddings", ()))
  s.train_workdir = needs.get("train_workdir", "")
  s.pretrained = needs.get("pretrained", "")
  s.generator_workdirs = tuple(needs.get("generator_workdirs", ()))
  s.own_data = bool(needs.get("own_data", False))
  s.source = needs.get("source", "")
  s.fit_scaling_factor = int(needs.get("fit_scaling_factor", 0))
  return s


def set_keys(config: ml_collections.ConfigDict, changes) -> None:
  """Sets {'a.b.c': value} on `config` (the keys must exist)."""
  for key, value in (changes or {}).items():
    node, *path = [config, *key.split(".")]
    for part in path[:-1]:
      node = node[part]
    node[path[-1]] = value


def base_config(table: str, title: str,
                data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every reproduce config holds; `data` is the evaluation's data config (shared)."""
  c = ml_collections.ConfigDict()
  c.table = table  # 'paper_a' | 'paper_b' | 'ablation' | 'embedded'
  c.title = title
  c.data = data
  c.model = ml_collections.ConfigDict()
  c.model.pretrained = ""  # the base SD for every stage ('' = the embedded tiny model)
  c.model.allow_pickle = False
  c.fid = ml_collections.ConfigDict()
  c.fid.weights = ""  # pytorch-fid's Inception weights for every evaluation
  c.fid.allow_pickle = False
  c.stages = ml_collections.ConfigDict()
  c.order = ()  # stage names in run order
  c.paper = ml_collections.ConfigDict()  # row -> the paper's number, printed beside ours
  c.ablation = ml_collections.ConfigDict()
  c.ablation.swept = ""  # e.g. 'vectors per token'
  c.ablation.swept_values = ()
  c.ablation.evaluations = ()  # evaluation stage per value
  c.notes = ()  # what this reproduction changes from the paper, for the report
  return c


def _ti_stages(c, ti, modality: str, paper: bool, suffix: str = "", changes=None) -> list[str]:
  """One textual-inversion stage per class token: only that class's images and prompt."""
  arg = "paper" if paper else ""
  names = []
  tokens = dict(zip([name for name, _ in ti.data.classes], ti.textual_inversion.tokens,
                    strict=True))
  for cls, token in tokens.items():
    name = f"train_{cls}{suffix}"
    s = stage("train", str(CONFIGS / f"{modality}_ti.py"), arg)
    s.config.textual_inversion.tokens = (tuple(token),)
    s.config.data.keep_classes = (cls,)
    s.config.sample.prompts = (ti.data.prompt.class_prompts[cls],)
    set_keys(s.config, changes)
    c.stages[name] = s
    names.append(name)
  return names


def paper_a(modality: str, paper: bool, ablation: str = "") -> ml_collections.ConfigDict:
  """Paper A's table (or one of its ablations) for 'mri' or 'cxr'."""
  arg = "paper" if paper else ""
  ev = config_args.load_config_file(str(CONFIGS / f"eval_paper_a_{modality}.py") +
                                    (":paper" if paper else ""))
  ti = config_args.load_config_file(str(CONFIGS / f"{modality}_ti.py"))
  title = f"Paper A ({modality.upper()}): classifier AUC with synthetic images"
  c = base_config("ablation" if ablation else "paper_a", title, ev.data)
  if modality == "mri":
    c.paper = ml_collections.ConfigDict(PAPER_A_MRI)
  prompts = dict(ti.data.prompt.class_prompts)
  notes = ["The generators (one textual-inversion run per class token) train on that class's "
           "images of the evaluation's real train split (split.json): paper A's 100 per class."]
  if not paper:
    notes.append("Embedded default: the tiny model, phantoms and small sizes (ours); the "
                 "paper's settings are the ':paper' arg.")
  order = []
  runs = [("", {})]
  if ablation:
    swept, paper_values, small_values, key = ABLATIONS[ablation]
    values = paper_values if paper else small_values
    runs = [(f"_{v}", {key: v}) for v in values]
    c.ablation.swept, c.ablation.swept_values = swept, tuple(values)
    if values != paper_values:
      notes.append(f"Ablation values {tuple(values)} (ours: the embedded default's train split "
                   f"is small); the paper's: {tuple(paper_values)}.")
  evaluations = []
  for suffix, changes in runs:
    trains = _ti_stages(c, ti, modality, paper, suffix, changes)
    name = f"evaluate{suffix}"
    e = stage("evaluate", str(CONFIGS / f"eval_paper_a_{modality}.py"), arg,
                        embeddings=tuple(trains))
    e.config.generation.prompts = prompts
    c.stages[name] = e
    order += trains + [name]
    evaluations.append(name)
  c.order = tuple(order)
  c.ablation.evaluations = tuple(evaluations) if ablation else ()
  c.notes = tuple(notes)
  return c


def paper_b(paper: bool) -> ml_collections.ConfigDict:
  """Paper B's table: the base model, then U-Net fine-tuning without and with the prior."""
  arg = "paper" if paper else ""
  ev = config_args.load_config_file(str(CONFIGS / "eval_paper_b.py") + (":paper" if paper else ""))
  title = "Paper B (CXR): VAE reconstruction and a classifier on generated images"
  c = base_config("paper_b", title, ev.data)
  c.paper = ml_collections.ConfigDict(PAPER_B)
  eval_file = str(CONFIGS / "eval_paper_b.py")
  unet_file = str(CONFIGS / "cxr_unet.py")
  c.stages.evaluate_base = stage("evaluate", eval_file, arg)
  c.stages.finetune = stage("train", unet_file, arg)
  c.stages.evaluate_finetune = stage("evaluate", eval_file, arg,
                                               train_workdir="finetune")
  c.stages.finetune_prior = stage("train", unet_file,
                                            ",".join(a for a in (arg, "prior") if a))
  c.stages.evaluate_finetune_prior = stage("evaluate", eval_file, arg,
                                                     train_workdir="finetune_prior")
  c.order = ("evaluate_base", "finetune", "evaluate_finetune", "finetune_prior",
             "evaluate_finetune_prior")
  notes = ["The fine-tuned U-Nets train on the evaluation's real train split (split.json)."]
  if not paper:
    notes.append("Embedded default: the tiny model, phantoms and small sizes (ours); the "
                 "paper's settings are the ':paper' arg.")
  c.notes = tuple(notes)
  return c
