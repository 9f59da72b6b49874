r"""Writes phantom data sets in the real CheXpert and PI-CAI on-disk layouts.

The real loaders then run end to end on them (CI has no access to the real data):

  python -m medjax.data.make_phantoms --kind=cxr --num=200 --out=/tmp/cxr
  python -m medjax.data.make_phantoms --kind=mri --num=20 --out=/tmp/picai

cxr: DIR/CheXpert-v1.0-small/{train,valid}.csv and .../{train,valid}/patientNNNNN/studyK/*.jpg
     (use root DIR/CheXpert-v1.0-small, or DIR).
mri: DIR/images/<patient>/<patient>_<study>_{t2w,adc,hbv}.mha,
     DIR/picai_labels/clinical_information/marksheet.csv and
     DIR/picai_labels/csPCa_lesion_delineations/human_expert/resampled/<patient>_<study>.nii.gz.
"""
import os
from collections.abc import Sequence

import numpy as np
from absl import app
from absl import flags
from PIL import Image

from medjax.data import labels as labels_lib
from medjax.data import phantoms
from medjax.data import tables
from medjax.data.optional import require
from medjax.errors import MedjaxError

CHEXPERT_DIR = "CheXpert-v1.0-small"
_CHEXPERT_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *labels_lib.CHEXPERT_LABELS)
_MARKSHEET_HEADER = ("patient_id", "study_id", "mri_date", "patient_age", "psa", "psad",
                     "prostate_volume", "histopath_type", "lesion_GS", "lesion_ISUP", "case_ISUP",
                     "case_csPCa")
_GLEASON = {2: "3+4", 3: "4+3", 4: "4+4", 5: "4+5"}


def _save_image(image: np.ndarray, path: str, image_format: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
  if image_format == "jpg":
    pixels.save(tmp, format="JPEG", quality=95)
  else:
    pixels.save(tmp, format="PNG")
  os.replace(tmp, path)


def _label_cell(value: float) -> str:
  return "" if np.isnan(value) else f"{value:.1f}"


def write_chexpert_phantoms(out: str, num: int, *, size: int = 512, seed: int = 0,
                            image_format: str = "jpg", effusion_fraction: float = 0.5,
                            cardiomegaly_fraction: float = 0.2) -> str:
  """Writes `num` frontal phantom CXRs as a CheXpert tree; returns the CheXpert root.

  Patients get one or two studies; every tenth patient goes to valid.csv. Some effusion labels
  are uncertain (-1) and unmentioned findings are blank, as in the real CSVs.
  """
  if num < 1:
    raise MedjaxError(f"make_phantoms: --num={num} must be positive")
  if image_format not in ("jpg", "png"):
    raise MedjaxError(f"make_phantoms: --format={image_format!r}; expected jpg or png")
  rng = np.random.default_rng(seed)
  root = os.path.join(out, CHEXPERT_DIR)
  rows = {"train": [], "valid": []}
  patient, study = 0, 0
  for i in range(num):
    if i == 0 or rng.random() < 0.7:
      patient, study = patient + 1, 1
    else:
      study += 1
    split = "valid" if patient % 10 == 0 else "train"
    effusion = bool(rng.random() < effusion_fraction)
    cardiomegaly = bool(rng.random() < cardiomegaly_fraction)
    side = str(rng.choice(["right", "left", "both"]))
    image = phantoms.chest_xray(size, seed=seed * 1_000_003 + i, effusion=effusion,
                                effusion_side=side, cardiomegaly=cardiomegaly)
    relative = (f"{CHEXPERT_DIR}/{split}/patient{patient:05d}/study{study}/"
                f"view1_frontal.{image_format}")
    _save_image(image, os.path.join(out, relative), image_format)
    cells = {name: np.nan for name in labels_lib.CHEXPERT_LABELS}
    if effusion:
      cells["Pleural Effusion"] = -1.0 if rng.random() < 0.1 else 1.0
    elif rng.random() < 0.5:
      cells["Pleural Effusion"] = 0.0
    if cardiomegaly:
      cells["Cardiomegaly"] = 1.0
    if not (effusion or cardiomegaly):
      cells["No Finding"] = 1.0
    rows[split].append([relative, str(rng.choice(["Female", "Male"])), int(rng.integers(20, 90)),
                        "Frontal", str(rng.choice(["AP", "PA"])),
                        *[_label_cell(cells[name]) for name in labels_lib.CHEXPERT_LABELS]])
  for split, split_rows in rows.items():
    tables.write_csv(os.path.join(root, f"{split}.csv"), _CHEXPERT_HEADER, split_rows)
  return root


def _write_volume(values: np.ndarray, spacing_zyx: Sequence[float], origin_zyx: Sequence[float],
                  path: str, dtype) -> None:
  sitk = require("SimpleITK", f"{path}: writing a phantom MRI volume")
  image = sitk.GetImageFromArray(values.astype(dtype))
  image.SetSpacing([float(v) for v in spacing_zyx[::-1]])
  image.SetOrigin([float(v) for v in origin_zyx[::-1]])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ext = ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1]
  tmp = f"{path[:-len(ext)]}.tmp{os.getpid()}{ext}"
  sitk.WriteImage(image, tmp, useCompression=True)
  os.replace(tmp, path)


def _sample_grid(shape, spacing, centre_offset):
  """Physical coordinates (mm) of a grid centred on the gland, plus its origin (z, y, x)."""
  origin = [-(n - 1) / 2.0 * s + c for n, s, c in zip(shape, spacing, centre_offset, strict=True)]
  axes = [o + np.arange(n) * s for o, n, s in zip(origin, shape, spacing, strict=True)]
  z, y, x = np.meshgrid(*axes, indexing="ij")
  return (z, y, x), origin


def write_picai_phantoms(out: str, num: int, *, size: int = 384, slices: int = 27,
                         seed: int = 0, lesion_fraction: float = 0.5) -> str:
  """Writes `num` prostate MRI phantom studies in the PI-CAI layout; returns `out`.

  T2W: size x size in-plane over 180 mm, `slices` x 3.6 mm. ADC and HBV: half the matrix over
  200 mm, shifted by half a slice, so the loader must really resample onto the T2W frame.
  """
  if num < 1:
    raise MedjaxError(f"make_phantoms: --num={num} must be positive")
  rng = np.random.default_rng(seed)
  labels_dir = os.path.join(out, "picai_labels")
  masks_dir = os.path.join(labels_dir, "csPCa_lesion_delineations", "human_expert", "resampled")
  marksheet = []
  for i in range(num):
    patient, study = str(10000 + i - i // 3), str(1000000 + i)
    lesion = bool(rng.random() < lesion_fraction)
    study_seed = seed * 1_000_003 + i
    noise = np.random.default_rng(study_seed + 1)
    t2w_spacing = (3.6, 180.0 / size, 180.0 / size)
    (z, y, x), t2w_origin = _sample_grid((slices, size, size), t2w_spacing, (0.0, 0.0, 0.0))
    t2w = phantoms.prostate_mri_sample(z, y, x, seed=study_seed, lesion=lesion)
    dwi_size = max(size // 2, 8)
    dwi_spacing = (3.6, 200.0 / dwi_size, 200.0 / dwi_size)
    (z, y, x), dwi_origin = _sample_grid((slices, dwi_size, dwi_size), dwi_spacing,
                                         (1.8, 0.7, -0.4))
    dwi = phantoms.prostate_mri_sample(z, y, x, seed=study_seed, lesion=lesion)
    base = os.path.join(out, "images", patient, f"{patient}_{study}")
    _write_volume(t2w["t2w"] * 1000 + noise.normal(0, 8, t2w["t2w"].shape), t2w_spacing,
                  t2w_origin, f"{base}_t2w.mha", np.int16)
    _write_volume(dwi["adc"] * 2500 + noise.normal(0, 20, dwi["adc"].shape), dwi_spacing,
                  dwi_origin, f"{base}_adc.mha", np.int16)
    _write_volume(dwi["hbv"] * 60 + noise.normal(0, 0.5, dwi["hbv"].shape), dwi_spacing,
                  dwi_origin, f"{base}_hbv.mha", np.float32)
    _write_volume(t2w["mask"], t2w_spacing, t2w_origin,
                  os.path.join(masks_dir, f"{patient}_{study}.nii.gz"), np.uint8)
    isup = int(rng.integers(2, 6)) if lesion else 0
    marksheet.append([patient, study, f"2019-{1 + i % 12:02d}-01", int(rng.integers(50, 80)),
                      round(float(rng.uniform(2, 20)), 1), "", "",
                      "SYSTEMATIC" if lesion else "", _GLEASON.get(isup, ""),
                      str(isup) if lesion else "", isup, "YES" if lesion else "NO"])
  tables.write_csv(os.path.join(labels_dir, "clinical_information", "marksheet.csv"),
                   _MARKSHEET_HEADER, marksheet)
  return out


FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_enum("kind", "cxr", ["cxr", "mri"], "Chest X-rays (CheXpert layout) or prostate MRI "
                    "(PI-CAI layout).")
  flags.DEFINE_integer("num", 100, "Number of images (cxr) or studies (mri).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_integer("size", None,
                       "Image size (cxr, default 512) or T2W matrix (mri, default 384).")
  flags.DEFINE_integer("seed", 0, "Seed; the same seed writes the same data set.")
  flags.DEFINE_enum("format", "jpg", ["jpg", "png"], "Image format of the chest X-rays.")


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  try:
    if FLAGS.kind == "cxr":
      root = write_chexpert_phantoms(FLAGS.out, FLAGS.num, size=FLAGS.size or 512,
                                     seed=FLAGS.seed, image_format=FLAGS.format)
      print(f"wrote {FLAGS.num} chest X-ray phantoms; CheXpert root: {root}")
    else:
      root = write_picai_phantoms(FLAGS.out, FLAGS.num, size=FLAGS.size or 384, seed=FLAGS.seed)
      print(f"wrote {FLAGS.num} prostate MRI phantom studies; PI-CAI root: {root}")
  except MedjaxError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
