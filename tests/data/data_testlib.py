"""Helpers for the data tests: writing files in the real dataset layouts."""
import gzip
import os

from PIL import Image

from medjax.data import labels as labels_lib

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *labels_lib.CHEXPERT_LABELS]


def save_png(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode=mode).save(path)


def chexpert_row(path, frontal="Frontal", view="PA", **labels):
  """A CSV row; labels by attribute-style name, e.g. Pleural_Effusion='1.0'."""
  cells = {name: "" for name in labels_lib.CHEXPERT_LABELS}
  for key, value in labels.items():
    cells[key.replace("_", " ")] = value
  return [path, "Female", "60", frontal, view, *[cells[n] for n in labels_lib.CHEXPERT_LABELS]]


def write_csv_gz(path, header, rows):
  with gzip.open(path, "wt", newline="") as f:
    f.write(",".join(header) + "\n")
    for row in rows:
      f.write(",".join(str(c) for c in row) + "\n")


REPORT = "\n".join([  # MIMIC-CXR style, with the lines of single spaces the real ones have
    "                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", "",
    " INDICATION:  ___F with cough", "", " FINDINGS:", " ",
    " Moderate right pleural effusion with a meniscus.  No pneumothorax.", " ", " IMPRESSION:",
    " ", " Right pleural effusion.", ""])



# Small protocol for the 64-pixel phantoms (180 mm FOV): 3 mm voxels, 48 x 48 crop, z 3.6 mm.
PICAI_SMALL = dict(spacing=(3.6, 3.0, 3.0), crop=(12, 48, 48))
PICAI_SEED = 5
