"""Text prompts for each example: from labels, classes, report sections or a placeholder token.

Templates are `str.format` strings over these fields: {modality} ('chest x-ray'), {class_text}
('pleural effusion'), {class_name}, {labels} ('pleural effusion, cardiomegaly'), {token}
('<lungxray>') and {text} (report section). Kinds (config.prompt.kind):
  class   class_prompts[class_name], else class_template  ('a chest x-ray with pleural effusion')
  labels  labels_template over positive labels, else no_labels_text
  report  report_template over the chosen section, else the 'labels' prompt
  token   token_template, for textual inversion  ('a photo of a <lungxray>')
  fixed   the fixed text
"""
import string
from collections.abc import Mapping, Sequence
from typing import Any

from medjax.data.records import Record
from medjax.errors import MedjaxError

KINDS = ("class", "labels", "report", "token", "fixed")
FIELDS = ("modality", "class_text", "class_name", "labels", "token", "text")
DEFAULT_LABEL_TEXTS = {"csPCa": "clinically significant prostate cancer"}


def _get(config: Any, key: str, default=None):
  try:
    value = config[key]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def check_template(template: str, where: str) -> None:
  """Fails on fields a template cannot fill (a typo would otherwise crash mid-training)."""
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
  except ValueError as e:
    raise MedjaxError(f"{where}: malformed template {template!r} ({e})") from None
  unknown = [name for name in names if name not in FIELDS]
  if unknown:
    raise MedjaxError(f"{where}: template {template!r} uses unknown field(s) {unknown}; "
                      f"available: {list(FIELDS)}")


def check_prompt_config(config: Any) -> None:
  kind = _get(config, "kind", "labels")
  if kind not in KINDS:
    raise MedjaxError(f"config.data.prompt.kind={kind!r}: expected one of {list(KINDS)}")
  for key in ("class_template", "labels_template", "no_labels_text", "report_template",
              "token_template", "fixed"):
    check_template(str(_get(config, key, "")), f"config.data.prompt.{key}")
  for name, text in dict(_get(config, "class_prompts", {})).items():
    check_template(str(text), f"config.data.prompt.class_prompts.{name}")


def label_text(name: str, config: Any = None) -> str:
  texts = dict(_get(config, "label_texts", {}) or {})
  return texts.get(name) or DEFAULT_LABEL_TEXTS.get(name) or name.lower()


def prompt_from_labels(labels: Mapping[str, float], *, modality: str = "chest x-ray",
                       template: str = "a {modality} with {labels}",
                       no_labels_text: str = "a {modality} with no finding",
                       exclude: Sequence[str] = ("No Finding",), config: Any = None) -> str:
  """'a chest x-ray with pleural effusion, cardiomegaly' or the no-finding text."""
  positive = [label_text(name, config) for name, value in labels.items()
              if value == 1.0 and name not in exclude]
  if not positive:
    return no_labels_text.format(modality=modality, labels="", class_text="", class_name="",
                                 token="", text="")
  return template.format(modality=modality, labels=", ".join(positive), class_text="",
                         class_name="", token="", text="")


def report_text(sections: Mapping[str, str] | None, section: str) -> str:
  """The chosen section(s) of a report: 'impression', 'findings' or 'findings+impression'."""
  if not sections:
    return ""
  return " ".join(sections.get(name, "") for name in section.split("+")).strip()


def make_prompt(record: Record, config: Any, class_names: Sequence[str] = ()) -> str:
  """The prompt for one record under `config` (config.data.prompt)."""
  kind = _get(config, "kind", "labels")
  class_name = class_names[record.class_index] if 0 <= record.class_index < len(class_names) else ""
  fields = {"modality": record.modality or "image", "class_name": class_name,
            "class_text": class_name.replace("_", " "), "labels": "", "token": "", "text": ""}
  if kind == "fixed":
    return str(_get(config, "fixed", "")).format(**fields)
  if kind == "token":
    fields["token"] = _get(config, "token", "<lungxray>")
    return _get(config, "token_template", "a photo of a {token}").format(**fields)
  if kind == "class" and class_name:
    explicit = dict(_get(config, "class_prompts", {}) or {}).get(class_name)
    template = explicit or _get(config, "class_template", "a {modality} with {class_text}")
    return str(template).format(**fields)
  if kind == "report":
    text = report_text(record.report, _get(config, "report_section", "impression"))
    max_words = int(_get(config, "max_words", 0) or 0)
    if text:
      if max_words:
        text = " ".join(text.split()[:max_words])
      fields["text"] = text
      return _get(config, "report_template", "{text}").format(**fields)
  if kind == "class" and not class_name and not record.labels:
    raise MedjaxError(f"{record.key}: prompt kind 'class' needs config.data.classes")
  return prompt_from_labels(
      record.labels, modality=fields["modality"],
      template=_get(config, "labels_template", "a {modality} with {labels}"),
      no_labels_text=_get(config, "no_labels_text", "a {modality} with no finding"),
      config=config)
