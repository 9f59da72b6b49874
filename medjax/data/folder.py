"""A plain folder of images: `root/<class>/*.png` (class from the sub-folder) or `root/*.png`.

A `name.txt` next to `name.png` is the image's caption (prompt kind 'report', section
'caption'). Every image counts as its own patient: folder data carries no patient ids, so
splits are image-level here.
"""
import os

from medjax.data import records as records_lib
from medjax.data import tables
from medjax.errors import MedjaxError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".nii",
              ".nii.gz", ".mha", ".mhd", ".nrrd")


def load_folder(root, *, class_from_subdir: bool = True, modality: str = "medical image",
                on_bad_file: str = "error") -> records_lib.DataIndex:
  """Indexes image files under `root`; labels are {<sub-folder>: 1.0} when `class_from_subdir`."""
  root = tables.check_root(root, "folder")
  bad = records_lib.BadFiles(on_bad_file)
  paths = []
  for directory, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    paths.extend(os.path.join(directory, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
  classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in paths
                    if os.sep in os.path.relpath(p, root)}) if class_from_subdir else []
  out = []
  for path in paths:
    relative = os.path.relpath(path, root)
    labels = {}
    if class_from_subdir:
      if os.sep not in relative:
        bad(f"{path}: image is not inside a class sub-folder of {root}")
        continue
      top = relative.split(os.sep)[0]
      labels = {name: float(name == top) for name in classes}
    report = None
    caption = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[0] + ".txt"
    if os.path.isfile(caption):
      with open(caption, encoding="utf-8", errors="replace") as f:
        report = {"caption": " ".join(f.read().split())}
    out.append(records_lib.Record(key=relative, patient_id=relative, kind="file", path=path,
                                  labels=labels, modality=modality, report=report))
  if not out:
    raise MedjaxError(f"{root}: no image files found")
  return records_lib.DataIndex(records=out, label_names=tuple(classes), source="folder",
                               skipped=bad.skipped)
