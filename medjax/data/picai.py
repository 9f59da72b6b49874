"""PI-CAI prostate MRI: per-study T2W/ADC/HBV volumes to labelled 3-channel axial slices.

Protocol (paper notes): every sequence is resampled onto the T2W's frame at 3 x 0.5 x 0.5 mm
(z, y, x), centre-cropped to 30 x 300 x 300 voxels, and stacked as R=T2W, G=ADC, B=HBV; an axial
slice is diseased if it holds csPCa lesion voxels. Resampling goes straight onto the cropped grid
(same voxels as resample-then-crop, at a tenth of the cost).

Layout: `images/<patient_id>/<patient_id>_<study_id>_{t2w,adc,hbv}.mha`, a `marksheet.csv`
(patient_id, study_id, case_csPCa) and lesion masks `<patient_id>_<study_id>.nii.gz`, e.g. from
picai_labels (`csPCa_lesion_delineations/human_expert/resampled/`).
"""
import collections
import dataclasses
import hashlib
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
from absl import logging

from medjax.data import records as records_lib
from medjax.data import tables
from medjax.data.optional import require
from medjax.errors import MedjaxError

SEQUENCES = ("t2w", "adc", "hbv")
LABEL = "csPCa"
_SEQUENCE_FILE = re.compile(r"^([^_]+)_([^_]+)_(t2w|adc|hbv)\.(mha|mhd|nrrd|nii|nii\.gz)$")
_MASK_FILE = re.compile(r"^([^_]+)_([^_]+)\.(nii\.gz|nii|mha)$")
_MIN_OVERLAP = 0.5  # fraction of the T2W crop an ADC/HBV series must cover


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How a study becomes slices; stored in every record so labels and pixels always agree."""
  spacing: tuple[float, float, float] = (3.0, 0.5, 0.5)  # z, y, x mm
  crop: tuple[int, int, int] = (30, 300, 300)  # z, y, x voxels
  percentiles: tuple[float, float] = (1.0, 99.9)  # per-channel intensity scaling
  lesion_threshold: float = 1.0  # mask values >= this are csPCa
  max_angle_deg: float = 10.0  # larger orientation differences between series are errors

  def __post_init__(self):
    if len(self.spacing) != 3 or min(self.spacing) <= 0:
      raise MedjaxError(f"PI-CAI spacing {self.spacing}: expected three positive mm values "
                        f"(z, y, x)")
    if len(self.crop) != 3 or min(self.crop) <= 0:
      raise MedjaxError(f"PI-CAI crop {self.crop}: expected three positive voxel counts (z, y, x)")
    lo, hi = self.percentiles
    if not 0 <= lo < hi <= 100:
      raise MedjaxError(f"PI-CAI percentiles {self.percentiles}: expected 0 <= low < high <= 100")


@dataclasses.dataclass(frozen=True)
class _Grid:
  origin: np.ndarray  # (x, y, z) mm, LPS
  spacing: np.ndarray  # (x, y, z)
  direction: np.ndarray  # 3 x 3, columns are axis directions
  size: np.ndarray  # (x, y, z)


def _sitk():
  return require("SimpleITK", "PI-CAI: reading .mha series and .nii.gz masks")


def _read_header(path: str) -> _Grid:
  sitk = _sitk()
  reader = sitk.ImageFileReader()
  reader.SetFileName(path)
  try:
    reader.ReadImageInformation()
  except RuntimeError as e:
    detail = " ".join(str(e).split())[:200]
    raise MedjaxError(f"{path}: unreadable image header ({detail})") from None
  if reader.GetDimension() != 3:
    raise MedjaxError(f"{path}: expected a 3D volume, found {reader.GetDimension()}D")
  return _Grid(np.array(reader.GetOrigin()), np.array(reader.GetSpacing()),
               np.array(reader.GetDirection()).reshape(3, 3), np.array(reader.GetSize()))


def _read_image(path: str):
  sitk = _sitk()
  try:
    image = sitk.ReadImage(path)
  except RuntimeError as e:
    raise MedjaxError(f"{path}: unreadable image ({' '.join(str(e).split())[:200]})") from None
  if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
    raise MedjaxError(f"{path}: expected a scalar 3D volume, found {image.GetDimension()}D with "
                      f"{image.GetNumberOfComponentsPerPixel()} component(s)")
  return image


def output_grid(t2w: _Grid, protocol: Protocol) -> _Grid:
  """The cropped grid in the T2W frame: resample to `spacing`, then take the centre `crop`."""
  spacing = np.array(protocol.spacing[::-1], float)  # (x, y, z)
  crop = np.array(protocol.crop[::-1], int)
  resampled_size = np.maximum(np.round(t2w.size * t2w.spacing / spacing), 1).astype(int)
  start = (resampled_size - crop) // 2  # negative: the crop is larger, pad
  origin = t2w.origin + t2w.direction @ (start * spacing)
  return _Grid(origin, spacing, t2w.direction, crop)


def _check_orientation(reference: _Grid, other: _Grid, path: str, reference_path: str,
                       protocol: Protocol) -> None:
  cosines = np.clip(np.sum(reference.direction * other.direction, axis=0), -1.0, 1.0)
  angles = np.degrees(np.arccos(cosines))
  if angles.max() > protocol.max_angle_deg:
    raise MedjaxError(f"{path}: orientation differs from {os.path.basename(reference_path)} by "
                      f"{angles.max():.1f} degrees (> {protocol.max_angle_deg}); the series are "
                      f"not co-registered")


def _resample(image, grid: _Grid, nearest: bool, default: float) -> np.ndarray:
  sitk = _sitk()
  out = sitk.Resample(
      image, [int(s) for s in grid.size], sitk.Transform(),
      sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
      [float(v) for v in grid.origin], [float(v) for v in grid.spacing],
      [float(v) for v in grid.direction.ravel()], default, sitk.sitkFloat32)
  return sitk.GetArrayFromImage(out)  # (z, y, x)


def _valid_slices(t2w: _Grid, grid: _Grid) -> np.ndarray:
  """Output slices whose centre lies within the T2W's slab (others would be padding only)."""
  k = np.arange(int(grid.size[2]))
  centre = (grid.size[:2] - 1) / 2.0
  indices = np.stack([np.full(k.shape, centre[0]), np.full(k.shape, centre[1]), k])
  points = grid.origin[:, None] + grid.direction @ (indices * grid.spacing[:, None])
  index = np.linalg.solve(t2w.direction, points - t2w.origin[:, None]) / t2w.spacing[:, None]
  return (index[2] >= -0.5) & (index[2] <= t2w.size[2] - 0.5)


def slice_labels(t2w_path: str, mask_path: str | None, protocol: Protocol) -> np.ndarray:
  """Per output slice: 1 if it contains csPCa voxels, 0 if not, -1 if it lies outside the T2W."""
  t2w = _read_header(t2w_path)
  grid = output_grid(t2w, protocol)
  labels = np.zeros(int(grid.size[2]), np.int8)
  if mask_path:
    mask = _read_image(mask_path)
    _check_orientation(t2w, _Grid(np.array(mask.GetOrigin()), np.array(mask.GetSpacing()),
                                  np.array(mask.GetDirection()).reshape(3, 3),
                                  np.array(mask.GetSize())), mask_path, t2w_path, protocol)
    values = _resample(mask, grid, nearest=True, default=0.0)
    labels = (values >= protocol.lesion_threshold).any(axis=(1, 2)).astype(np.int8)
  labels[~_valid_slices(t2w, grid)] = -1
  return labels


def _normalise(values: np.ndarray, valid: np.ndarray, percentiles, path: str) -> np.ndarray:
  if not valid.any():
    raise MedjaxError(f"{path}: no voxels inside the crop")
  lo, hi = np.percentile(values[valid], percentiles)
  if hi <= lo:
    hi = lo + 1.0
  out = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
  out[~valid] = 0.0
  return out.astype(np.float32)


def process_study(paths: dict[str, str], protocol: Protocol) -> np.ndarray:
  """Resamples, crops, normalises and stacks one study: float32 (D, H, W, 3) in [0, 1].

  Raises:
    MedjaxError for unreadable series, mismatched orientation, or an ADC/HBV series that does not
    cover the T2W crop (which would otherwise give a silently blank channel).
  """
  t2w_image = _read_image(paths["t2w"])
  t2w = _Grid(np.array(t2w_image.GetOrigin()), np.array(t2w_image.GetSpacing()),
              np.array(t2w_image.GetDirection()).reshape(3, 3), np.array(t2w_image.GetSize()))
  grid = output_grid(t2w, protocol)
  channels, reference_valid = [], None
  for name in SEQUENCES:
    image = t2w_image if name == "t2w" else _read_image(paths[name])
    if name != "t2w":
      _check_orientation(t2w, _Grid(np.array(image.GetOrigin()), np.array(image.GetSpacing()),
                                    np.array(image.GetDirection()).reshape(3, 3),
                                    np.array(image.GetSize())), paths[name], paths["t2w"], protocol)
    values = _resample(image, grid, nearest=False, default=np.nan)
    valid = np.isfinite(values)
    if reference_valid is None:
      reference_valid = valid
    else:
      covered = (valid & reference_valid).sum() / max(reference_valid.sum(), 1)
      if covered < _MIN_OVERLAP:
        raise MedjaxError(f"{paths[name]}: covers only {covered:.0%} of the T2W crop; the series "
                          f"do not overlap")
      valid &= reference_valid
    channels.append(_normalise(np.nan_to_num(values), valid, protocol.percentiles, paths[name]))
  return np.stack(channels, axis=-1)


class _StudyCache:
  """Processed volumes: a small in-memory LRU, optionally backed by .npy files in `cache_dir`.

  Shuffled slices of one study arrive far apart, so without `cache_dir` most slices pay for a
  full study resampling; with it each study is processed once (float16, memory-mapped reads).
  """

  def __init__(self, capacity: int = 4):
    self.capacity = capacity
    self.volumes: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self.lock = threading.Lock()

  def get(self, paths: dict[str, str], protocol: Protocol, cache_dir: str) -> np.ndarray:
    key = hashlib.sha1(repr((sorted(paths.items()), dataclasses.astuple(protocol))).encode()
                       ).hexdigest()
    with self.lock:
      if key in self.volumes:
        self.volumes.move_to_end(key)
        return self.volumes[key]
    cached = os.path.join(cache_dir, f"picai_{key}.npy") if cache_dir else ""
    if cached and os.path.isfile(cached):
      volume = np.load(cached, mmap_mode="r")
    else:
      volume = process_study(paths, protocol)
      if cached:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.tmp{os.getpid()}_{threading.get_ident()}.npy"
        np.save(tmp, volume.astype(np.float16))
        os.replace(tmp, cached)
    with self.lock:
      self.volumes[key] = volume
      while len(self.volumes) > self.capacity:
        self.volumes.popitem(last=False)
    return volume


_CACHE = _StudyCache()


def load_slice(record: records_lib.Record, cache_dir: str = "") -> np.ndarray:
  """Pixels of a PI-CAI slice record: float32 (H, W, 3) in [0, 1], channels T2W, ADC, HBV."""
  paths = {"t2w": record.path, "adc": record.get("adc"), "hbv": record.get("hbv")}
  volume = _CACHE.get(paths, record.get("protocol"), cache_dir)
  return np.asarray(volume[record.get("slice")], np.float32)


def _find_marksheet(root: str, marksheet: str) -> str | None:
  if marksheet:
    path = marksheet if os.path.isabs(marksheet) else os.path.join(root, marksheet)
    if not os.path.isfile(path):
      raise MedjaxError(f"{path}: PI-CAI marksheet not found")
    return path
  found = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f == "marksheet.csv")
  if len(found) > 1:
    raise MedjaxError(f"{root}: several marksheet.csv files {found}; set picai.marksheet")
  return found[0] if found else None


def _find_masks(root: str, masks_dir: str) -> dict[tuple[str, str], str]:
  """(patient_id, study_id) -> mask path; prefers human-expert, T2W-resampled delineations."""
  search = root
  if masks_dir:
    search = masks_dir if os.path.isabs(masks_dir) else os.path.join(root, masks_dir)
    if not os.path.isdir(search):
      raise MedjaxError(f"{search}: PI-CAI masks directory does not exist")
  candidates: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
  for directory, dirs, files in os.walk(search):
    dirs.sort()
    for name in files:
      match = _MASK_FILE.match(name)
      if match:
        candidates[(match.group(1), match.group(2))].append(os.path.join(directory, name))
  def score(path: str) -> int:
    return ("human_expert" in path) * 2 + ("resampled" in path)

  out = {}
  for key, paths in candidates.items():
    best = max(score(p) for p in paths)
    top = [p for p in paths if score(p) == best]
    if len(top) > 1:
      raise MedjaxError(f"{search}: several lesion masks for study {key[0]}_{key[1]}: {top}; "
                        f"set picai.masks_dir")
    out[key] = top[0]
  return out


def _find_studies(images_dir: str, bad) -> list[tuple[str, str, dict[str, str]]]:
  studies: dict[tuple[str, str], dict[str, str]] = collections.defaultdict(dict)
  for directory, dirs, files in os.walk(images_dir):
    dirs.sort()
    for name in files:
      match = _SEQUENCE_FILE.match(name)
      if match:
        studies[(match.group(1), match.group(2))][match.group(3)] = os.path.join(directory, name)
  out = []
  for (patient, study), paths in sorted(studies.items()):
    missing = [s for s in SEQUENCES if s not in paths]
    if missing:
      bad(f"{os.path.dirname(next(iter(paths.values())))}: study {patient}_{study} lacks "
          f"{'/'.join(missing)} series")
      continue
    out.append((patient, study, paths))
  return out


def load_picai(root, *, spacing: Sequence[float] = (3.0, 0.5, 0.5),
               crop: Sequence[int] = (30, 300, 300), percentiles: Sequence[float] = (1.0, 99.9),
               lesion_threshold: float = 1.0, max_angle_deg: float = 10.0, marksheet: str = "",
               masks_dir: str = "", on_bad_file: str = "error") -> records_lib.DataIndex:
  """Indexes PI-CAI axial slices with a csPCa label each (from the resampled lesion mask).

  Args:
    root: holds `images/` (or the patient folders directly), the marksheet and masks.
    spacing, crop, percentiles, lesion_threshold, max_angle_deg: see `Protocol`.
    marksheet: path (relative to root or absolute); default: the one `marksheet.csv` under root.
    masks_dir: directory of `<patient>_<study>.nii.gz`; default: searched under root.
    on_bad_file: 'error' or 'skip'.

  A study without a mask is all-healthy only if the marksheet says case_csPCa=NO; otherwise its
  slice labels are unknown and the study is a bad file. Slices outside the T2W slab are dropped.
  """
  root = tables.check_root(root, "PI-CAI")
  protocol = Protocol(tuple(float(v) for v in spacing), tuple(int(v) for v in crop),
                      tuple(float(v) for v in percentiles), float(lesion_threshold),
                      float(max_angle_deg))
  bad = records_lib.BadFiles(on_bad_file)
  images_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
  studies = _find_studies(images_dir, bad)
  if not studies:
    raise MedjaxError(f"{images_dir}: no PI-CAI studies (<patient>_<study>_t2w/adc/hbv.mha files)")
  marksheet_path = _find_marksheet(root, marksheet)
  cases: dict[tuple[str, str], str] = {}
  if marksheet_path:
    for line, row in tables.read_csv(marksheet_path, ["patient_id", "study_id", "case_csPCa"]):
      value = row["case_csPCa"].strip().upper()
      if value not in ("YES", "NO"):
        bad(f"{marksheet_path}:{line}: case_csPCa={value!r}; expected YES or NO")
        continue
      cases[(row["patient_id"].strip(), row["study_id"].strip())] = value
  masks = _find_masks(root, masks_dir)

  out = []
  for patient, study, paths in studies:
    case = cases.get((patient, study))
    mask = masks.get((patient, study))
    if mask is None and case != "NO":
      why = "is csPCa-positive in the marksheet" if case else "has no marksheet row"
      bad(f"{paths['t2w']}: no lesion mask {patient}_{study}.nii.gz and the study {why}, so its "
          f"slice labels are unknown")
      continue
    try:
      for name in ("adc", "hbv"):
        _check_orientation(_read_header(paths["t2w"]), _read_header(paths[name]), paths[name],
                           paths["t2w"], protocol)
      labels = slice_labels(paths["t2w"], mask, protocol)
    except MedjaxError as e:
      bad(str(e))
      continue
    extra_common = (("adc", paths["adc"]), ("hbv", paths["hbv"]), ("mask", mask or ""),
                    ("study", f"{patient}_{study}"), ("protocol", protocol),
                    ("case_csPCa", case or ""))
    for index, label in enumerate(labels):
      if label < 0:
        continue
      out.append(records_lib.Record(
          key=f"{patient}_{study}/slice{index:03d}", patient_id=patient, kind="picai",
          path=paths["t2w"], labels={LABEL: float(label)}, modality="prostate mri",
          view="axial", extra=extra_common + (("slice", index),)))
  unused = len(set(cases) - {(p, s) for p, s, _ in studies})
  if unused:
    logging.info("PI-CAI: %d marksheet rows have no images under %s", unused, images_dir)
  return records_lib.DataIndex(records=out, label_names=(LABEL,), source="picai",
                               skipped=bad.skipped)
