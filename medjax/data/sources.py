"""`load_index(config)`: the configured source's full index, before classes and splits."""
from typing import Any

import numpy as np

from medjax.data import labels as labels_lib
from medjax.data import phantoms
from medjax.data import records as records_lib
from medjax.data.chexpert import load_chexpert
from medjax.data.folder import load_folder
from medjax.data.mimic import load_mimic
from medjax.data.picai import load_picai
from medjax.errors import MedjaxError

SOURCES = ("", "phantoms", "chexpert", "mimic", "picai", "folder")
PHANTOM_KINDS = ("cxr", "mri", "cxr+mri")


def phantom_index(kind: str = "cxr", num: int = 600, seed: int = 0, *,
                  effusion_fraction: float = 0.5, cardiomegaly_fraction: float = 0.2,
                  lesion_fraction: float = 0.5) -> records_lib.DataIndex:
  """Phantom records (pixels are generated at the requested resolution when loaded).

  kind 'cxr+mri' alternates the two (even indices chest X-rays, odd prostate MRI) under one
  label set: what the embedded model is trained on, one model for both modalities.
  """
  if kind not in PHANTOM_KINDS:
    raise MedjaxError(f"config.data.phantoms.kind={kind!r}: expected one of {list(PHANTOM_KINDS)}")
  if num < 1:
    raise MedjaxError(f"config.data.phantoms.num={num}: must be positive")
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    image_seed = int(seed) * 1_000_003 + i
    if kind == "cxr" or (kind == "cxr+mri" and i % 2 == 0):
      effusion = bool(rng.random() < effusion_fraction)
      cardiomegaly = bool(rng.random() < cardiomegaly_fraction)
      side = str(rng.choice(["right", "left", "both"]))
      labels = {name: 0.0 for name in labels_lib.CHEXPERT_LABELS}
      labels.update(phantoms.chest_xray_labels(effusion, cardiomegaly))
      extra = (("seed", image_seed), ("effusion", effusion), ("effusion_side", side),
               ("cardiomegaly", cardiomegaly))
      out.append(records_lib.Record(key=f"phantom_cxr/{i:06d}", patient_id=f"phantom{i:06d}",
                                    kind="phantom_cxr", labels=labels, modality="chest x-ray",
                                    view="PA", extra=extra))
    else:
      lesion = bool(rng.random() < lesion_fraction)
      out.append(records_lib.Record(key=f"phantom_mri/{i:06d}", patient_id=f"phantom{i:06d}",
                                    kind="phantom_mri", labels={"csPCa": float(lesion)},
                                    modality="prostate mri", view="axial",
                                    extra=(("seed", image_seed), ("lesion", lesion))))
  names = {"cxr": labels_lib.CHEXPERT_LABELS, "mri": ("csPCa",),
           "cxr+mri": (*labels_lib.CHEXPERT_LABELS, "csPCa")}[kind]
  return records_lib.DataIndex(records=out, label_names=names, source="phantoms")


def load_index(config: Any) -> records_lib.DataIndex:
  """Builds the index for `config.source` (config is `config.data`)."""
  source = config.source
  if source not in SOURCES:
    raise MedjaxError(f"config.data.source={source!r}: expected one of {list(SOURCES)}")
  policy = config.on_bad_file
  records_lib.BadFiles(policy)  # validates the policy before any I/O
  if source in ("", "phantoms"):
    p = config.phantoms
    return phantom_index(p.kind, p.num, p.seed, effusion_fraction=p.effusion_fraction,
                         cardiomegaly_fraction=p.cardiomegaly_fraction,
                         lesion_fraction=p.lesion_fraction)
  if source == "chexpert":
    c = config.chexpert
    return load_chexpert(config.root, frontal_only=c.frontal_only, views=c.views,
                         uncertainty=c.uncertainty, blank=c.blank, check_files=config.check_files,
                         on_bad_file=policy)
  if source == "mimic":
    c = config.mimic
    return load_mimic(config.root, views=c.views, uncertainty=c.uncertainty, blank=c.blank,
                      reports=c.reports, reports_dir=c.reports_dir,
                      check_files=config.check_files, on_bad_file=policy)
  if source == "picai":
    c = config.picai
    return load_picai(config.root, spacing=c.spacing, crop=c.crop, percentiles=c.percentiles,
                      lesion_threshold=c.lesion_threshold, max_angle_deg=c.max_angle_deg,
                      marksheet=c.marksheet, masks_dir=c.masks_dir, on_bad_file=policy)
  c = config.folder
  return load_folder(config.root, class_from_subdir=c.class_from_subdir, modality=c.modality,
                     on_bad_file=policy)
