"""Where each setting of a paper protocol comes from: the paper, RoentGen, borrowed, or ours.

A reproduction is only as good as the reader's knowledge of which numbers the paper fixed and
which we chose. `settings(config)` lists, for an evaluation config (configs/eval_paper_*.py) or a
`:paper` training config (`config.protocol` set), each setting that decides the numbers with its
value and source:
  'paper A' / 'paper B'          the paper states this value (de Wilde et al. / Chambon et al.)
  'borrowed from paper A'        paper B (or paper A's CXR protocol) states none; paper A's
                                 prostate protocol value is used
  'borrowed from RoentGen (...)' paper B states none; its follow-up RoentGen's value is used
  'given'                        a path the user gave (model weights): check it is the paper's
  'ours'                         the papers state nothing, or the value differs from theirs
                                 (the embedded default's reductions): 'paper_value' says theirs
The papers' values are those their texts and public code state; RoentGen is paper B's
follow-up (sampling with guidance 4 and 75 PNDM steps).
"""
import dataclasses
from typing import Any

PAPER_A = "paper A"
PAPER_B = "paper B"
BORROWED_A = "borrowed from paper A"
BORROWED_ROENTGEN = "borrowed from RoentGen (paper B follow-up)"
GIVEN = "given"
OURS = "ours"
NOT_STATED = "not stated"
BY = {BORROWED_A: "paper A: ", BORROWED_ROENTGEN: "RoentGen: "}
HEADER = ["setting", "value", "source", "paper's value"]
BASE_MODELS = {"paper_a": "SD 2.0 512-base-ema", "paper_b": "SD 1.4"}
FID_WEIGHTS = "pytorch-fid Inception pt_inception-2015-12-05"


@dataclasses.dataclass(frozen=True)
class Ref:
  """A value stated somewhere, and where (`source`: PAPER_A, BORROWED_A, ...)."""
  value: Any
  source: str  # OURS: a hint at where our value comes from (the paper states none)
  text: str = ""  # how to show it; '' = the value


def row(setting: str, key: str, value: Any, ref: Ref | None, shown: str = "") -> dict:
  """One setting: {setting, key, value, source, paper_value}; source 'ours' unless the value is
  the reference's."""
  stated = (ref.text or fmt(ref.value)) if ref else ""
  if ref is None:
    paper = NOT_STATED
  elif ref.source in (PAPER_A, PAPER_B):
    paper = stated
  else:  # borrowed, or a hint at ours: the paper itself states nothing
    paper = f"{NOT_STATED} ({BY.get(ref.source, '')}{stated})"
  source = ref.source if ref is not None and same(value, ref.value) else OURS
  return {"setting": setting, "key": key, "value": _plain(value), "shown": shown or fmt(value),
          "source": source, "paper_value": paper}


def same(a: Any, b: Any) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
  return _plain(a) == _plain(b)


def fmt(value: Any) -> str:
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (tuple, list)):
    return " / ".join(fmt(v) for v in value)
  return str(value)


def _plain(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def settings(config: Any) -> list[dict]:
  """The provenance rows of an evaluation config, or of a training config whose `protocol` is
  set (a `:paper` config); [] for a training config without one."""
  if "generation" in config:
    return _eval_settings(config)
  return _train_settings(config) if config.get("protocol") else []


def table(rows: list[dict]) -> list[list[str]]:
  """[HEADER, *rows] as strings, for a Markdown table."""
  return [HEADER] + [[r["setting"], r["shown"], r["source"], r["paper_value"]] for r in rows]


def markdown(rows: list[dict]) -> list[str]:
  """A '## Settings' section (after a blank line): the table, one line per setting; [] for
  no rows."""
  if not rows:
    return []
  head, *body = table(rows)
  lines = ["", "## Settings", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]


def train_summary(config: Any) -> dict:
  """{'settings': rows} for summary.json of a `:paper` training run; {} otherwise."""
  rows = settings(config)
  return {"settings": rows} if rows else {}


def _modality(config: Any) -> str:
  source = config.data.source
  return "mri" if source == "picai" or (not source and config.data.phantoms.kind == "mri") \
      else "cxr"


def _model(config: Any, protocol: str) -> dict:
  m = config.model
  given = m.get("train_workdir") or m.pretrained
  base = BASE_MODELS.get(protocol, NOT_STATED)
  if given:
    return {**row("base model", "model", given, Ref(given, GIVEN)), "paper_value": base}
  what = ("embedded tiny SD, random weights" if m.get("embedded_random")
          else "embedded tiny SD, trained on phantoms")
  return {**row("base model", "model.pretrained", what, None), "paper_value": base}


def _eval_settings(c: Any) -> list[dict]:
  a = c.protocol == "paper_a"
  # Paper A states its downstream protocol for prostate MRI only; its CXR protocol borrows it.
  pa = PAPER_A if a and _modality(c) == "mri" else BORROWED_A
  borrowed = lambda v, text="": Ref(v, pa, text)  # paper A's value, stated or borrowed
  split = c.data.split
  sizes = (tuple(split.sizes) if split.mode == "sizes" else
           "the dataset's own splits" if split.mode == "source" else
           f"random fractions {fmt(tuple(split.fractions))}")
  num_classes = max(len(c.data.classes), 1)
  synthetic = c.generation.num_per_class * num_classes
  cls, gen, fid = c.classifier, c.generation, c.fid
  rows = [
      _model(c, c.protocol),
      row("resolution", "resolution", c.resolution, Ref(512, PAPER_A if a else PAPER_B)),
      row("split sizes (train / val / test)", "data.split", sizes,
          borrowed((200, 200, 200)) if a else None),
      row("classifier", "classifier.model", cls.model,
          borrowed("resnet18") if a else Ref("densenet121", PAPER_B)),
      row("classifier learning rate", "classifier.learning_rate", cls.learning_rate,
          borrowed(1e-4) if a else Ref(1e-4, BORROWED_A)),
      row("classifier batch size", "classifier.batch_size", cls.batch_size,
          borrowed(32) if a else Ref(32, BORROWED_A)),
      row("classifier steps", "classifier.num_steps", cls.num_steps,
          borrowed(6250) if a else Ref(6250, BORROWED_A)),
      row("classifier input size", "classifier.image_size", cls.image_size,
          borrowed(196) if a else None),
      row("classifier kept", "classifier.select", cls.select, None),
      row("repeats", "repeats", c.repeats, borrowed(5) if a else None),
      row("synthetic images", "generation.num_per_class", synthetic,
          borrowed(2000, "2,000 (1,000 per class)") if a else None),
      row("sampler", "generation.scheduler", gen.scheduler,
          None if a else Ref("pndm", BORROWED_ROENTGEN)),
      row("sampling steps", "generation.num_inference_steps", gen.num_inference_steps,
          None if a else Ref(75, BORROWED_ROENTGEN)),
      row("guidance scale", "generation.guidance_scale", gen.guidance_scale,
          None if a else Ref(4.0, BORROWED_ROENTGEN)),
      row("FID features", "fid.dims", fid.dims or 2048,
          Ref(2048, PAPER_A if a else PAPER_B, "2,048 (Inception pool)")),
      row("FID images per set", "fid.max_images", fid.max_images or "all",
          Ref("all", PAPER_A, "all (~100 training images)") if a else None),
      row("FID weights", "fid.weights", FID_WEIGHTS if not fid.random_weights
          else FID_WEIGHTS + ", or random when not found",
          Ref(FID_WEIGHTS, PAPER_A, FID_WEIGHTS + " (torchmetrics FID)") if a else None),
      row("FID reference", "fid.reference", fid.reference,
          Ref("generator_train", PAPER_A, "generator_train (the ~100 images per class the "
              "embeddings trained on)") if a else None),
      row("FID resize", "fid.resize", fid.resize,
          None if a else Ref("clean", BORROWED_ROENTGEN, "clean (clean-fid, PIL bicubic)")),
  ]
  rows += _privacy_rows(c)
  if not a:
    rows.append(row("VAE reconstruction images", "recon.num_images", c.recon.num_images, None))
    if "resolutions" in c.recon:
      rows.append(row("VAE table resolutions", "recon.resolutions", tuple(c.recon.resolutions),
                      Ref(None, PAPER_B, "several (the VAE works at any resolution)")))
  return rows


def _privacy_rows(c: Any) -> list[dict]:
  """The privacy audit (medjax.eval.privacy_report) is ours: neither paper audits its images."""
  p = c.get("privacy")
  if p is None:
    return []
  on = c.protocol == "privacy" or p.get("enabled", False)
  rows = [row("privacy audit", "privacy.enabled", "on" if on else "off", None)]
  if on:
    rows += [row("privacy audit features", "privacy.features", p.features, None),
             row("privacy audit false-positive budget (%)", "privacy.percentile", p.percentile,
                 None),
             row("privacy audit calibrated on held-out images through the VAE",
                 "privacy.heldout_through_vae", p.get("heldout_through_vae", False), None),
             row("privacy audit power probes (VAE round trips of training images)",
                 "privacy.power_probes", p.get("power_probes", 0), None)]
  return rows


def _train_settings(c: Any) -> list[dict]:
  a, ti = c.protocol == "paper_a", c.objective == "textual_inversion"
  paper = PAPER_A if a else PAPER_B
  steps = {"picai": 100_000}.get(c.data.source, 50_000)  # 50k CheXpert / PatchCamelyon
  rows = [
      _model(c, c.protocol),
      row("resolution", "resolution", c.resolution, Ref(512, paper)),
      row("steps", "total_steps", c.total_steps, Ref(steps, PAPER_A) if a and ti else
          Ref(3000, OURS, "diffusers' textual_inversion example: 3,000") if ti else None),
      row("learning rate", "learning_rate", c.learning_rate,
          Ref(5e-3, OURS, "the web UI's embedding default: 0.005") if a and ti else
          Ref(5e-4, OURS, "diffusers' textual_inversion example: 0.0005") if ti else None),
      row("images per class", "data.per_class", c.data.per_class or "all",
          Ref(100, PAPER_A) if a and ti else
          Ref(None, PAPER_B, "a few" if ti else "1,000s of images in all")),
  ]
  if ti:
    rows.insert(3, row("vectors per token", "textual_inversion.num_vectors",
                       c.textual_inversion.num_vectors, Ref(64, PAPER_A) if a else
                       Ref(1, OURS, "textual inversion's usual: 1")))
  return rows
