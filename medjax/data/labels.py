"""CheXpert-style finding labels (shared by CheXpert and MIMIC-CXR) and uncertainty policies.

Label cells are 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned). The
policy decides what uncertain and blank become; 'ignore' leaves the label unknown, so it is
masked in losses and never matches a class condition.
"""
from collections.abc import Mapping

from medjax.errors import MedjaxError

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")

UNCERTAINTY_POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": None}
BLANK_POLICIES = {"zeros": 0.0, "ignore": None}


def _cell_value(cell: str) -> float | None:
  try:
    value = float(cell)
  except ValueError:
    return None
  return value if value in (1.0, 0.0, -1.0) else None


def check_policies(uncertainty: str, blank: str, where: str) -> None:
  if uncertainty not in UNCERTAINTY_POLICIES:
    raise MedjaxError(f"{where}: uncertainty={uncertainty!r}; expected one of "
                      f"{sorted(UNCERTAINTY_POLICIES)}")
  if blank not in BLANK_POLICIES:
    raise MedjaxError(f"{where}: blank={blank!r}; expected one of {sorted(BLANK_POLICIES)}")


def parse_labels(row: Mapping[str, str], *, uncertainty: str, blank: str,
                 where: str) -> dict[str, float]:
  """Returns label -> 1.0/0.0 for one CSV row; labels resolved to 'ignore' are left out.

  Raises:
    MedjaxError naming `where` (file:line) for a value outside {1, 0, -1, blank}.
  """
  labels: dict[str, float] = {}
  for name in CHEXPERT_LABELS:
    cell = row[name].strip()
    value: float | None
    if not cell:
      value = BLANK_POLICIES[blank]
    else:
      value = _cell_value(cell)
      if value is None:
        raise MedjaxError(f"{where}: label {name!r} has value {cell!r}; expected 1, 0, -1 or blank")
      if value < 0:
        value = UNCERTAINTY_POLICIES[uncertainty]
    if value is not None:
      labels[name] = value
  return labels
