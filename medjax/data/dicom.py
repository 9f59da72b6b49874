"""DICOM pixels to display values in [0, 1], the way a radiologist's viewer would show them.

Order follows the DICOM grayscale pipeline (PS3.4 N.2): stored values -> Modality LUT or
RescaleSlope/Intercept -> VOI LUT or window -> presentation (MONOCHROME1 inverted), so that bone
is bright in every output. Patient identifiers are never read into messages or outputs.
"""
import os

import numpy as np

from medjax.data.optional import require
from medjax.errors import MedjaxError

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Only these elements are parsed: identifiers (PatientName, PatientID, BirthDate, ...) are never
# decoded, so they cannot reach a log line, an error message or an output.
_NEEDED_KEYWORDS = (
    *_PIXEL_KEYWORDS, "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "SharedFunctionalGroupsSequence", "Modality",
    "PixelPaddingValue", "FloatPixelPaddingValue", "DoubleFloatPixelPaddingValue")


def _read_dataset(path: str):
  pydicom = require("pydicom", f"{path}: reading a DICOM file")
  errors = require("pydicom.errors", f"{path}: reading a DICOM file")
  try:
    return pydicom.dcmread(path, specific_tags=list(_NEEDED_KEYWORDS))
  except errors.InvalidDicomError:
    pass  # No preamble/'DICM' prefix: many legacy files; retry leniently below.
  except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
    raise MedjaxError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None
  try:
    ds = pydicom.dcmread(path, force=True, specific_tags=list(_NEEDED_KEYWORDS))
  except Exception as e:  # pylint: disable=broad-except  # pydicom raises many types on garbage.
    raise MedjaxError(f"{path}: not a DICOM file ({type(e).__name__}: {e})") from None
  if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
    raise MedjaxError(f"{path}: not a readable DICOM image (no 'DICM' header, and no pixel data "
                      f"could be parsed without one)")
  return ds


def _promote_shared_functional_groups(ds) -> None:
  """Enhanced (multi-frame) objects keep rescale and window in the shared functional groups."""
  groups = ds.get("SharedFunctionalGroupsSequence")
  if not groups:
    return
  group = groups[0]
  for sequence, keywords in (("PixelValueTransformationSequence",
                              ("RescaleSlope", "RescaleIntercept")),
                             ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth",
                                                      "VOILUTFunction"))):
    items = group.get(sequence)
    if items:
      for keyword in keywords:
        if keyword in items[0] and keyword not in ds:
          setattr(ds, keyword, items[0][keyword].value)


def _decode(ds, path: str) -> np.ndarray:
  if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
    raise MedjaxError(f"{path}: DICOM file has no pixel data (e.g. a report or structured set)")
  photometric = str(ds.get("PhotometricInterpretation", "")).strip()
  if photometric == "PALETTE COLOR":
    raise MedjaxError(f"{path}: PALETTE COLOR DICOM images are not supported")
  try:
    return ds.pixel_array
  except (RuntimeError, NotImplementedError) as e:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(syntax, "name", str(syntax))
    # pydicom's message lists the missing decoder packages (pylibjpeg, gdcm, pyjpegls, ...).
    detail = " ".join(str(e).split())
    raise MedjaxError(f"{path}: cannot decode transfer syntax {syntax_name!r}: no installed pixel "
                      f"data handler ({detail})") from None
  except (ValueError, AttributeError, KeyError, TypeError, OSError) as e:
    raise MedjaxError(f"{path}: corrupt or truncated DICOM pixel data ({type(e).__name__}: "
                      f"{' '.join(str(e).split())})") from None


def _first(value) -> float:
  """WindowCenter/Width may be multi-valued (several presets); the first is the default view."""
  if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
    value = value[0]
  return float(value)


def apply_window(values: np.ndarray, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
  """Maps modality values to [0, 1] with the DICOM VOI window (PS3.3 C.11.2.1.2)."""
  values = np.asarray(values, np.float64)
  function = (function or "LINEAR").upper()
  if function == "SIGMOID":
    out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
  elif function == "LINEAR_EXACT":
    out = (values - center) / width + 0.5
  else:
    width = max(width, 1.0)  # LINEAR requires width >= 1
    out = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
  values = np.asarray(values, np.float64)
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros(values.shape, np.float32)
  return ((values - lo) / (hi - lo)).astype(np.float32)


def _grayscale_to_unit(pixels: np.ndarray, ds, window: tuple[float, float] | None,
                       path: str) -> np.ndarray:
  pixels_lib = require("pydicom.pixels", f"{path}: reading a DICOM file")
  try:
    values = pixels_lib.apply_modality_lut(pixels, ds)
  except Exception as e:  # pylint: disable=broad-except
    raise MedjaxError(f"{path}: invalid Modality LUT / rescale attributes ({e})") from None
  if window is not None:
    out = apply_window(values, float(window[0]), float(window[1]))
  elif ds.get("VOILUTSequence"):
    item = ds.VOILUTSequence[0]
    bits = int(item.LUTDescriptor[2]) or 16
    try:
      lut = pixels_lib.apply_voi_lut(values, ds, prefer_lut=True)
      out = np.asarray(lut, np.float64) / (2 ** bits - 1)
    except Exception as e:  # pylint: disable=broad-except
      raise MedjaxError(f"{path}: invalid VOI LUT Sequence ({e})") from None
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
  elif "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None:
    out = apply_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                       str(ds.get("VOILUTFunction", "LINEAR")))
  else:
    # No display window in the file: stretch the observed range (per frame stack).
    out = _min_max(values)
  if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
    out = 1.0 - out  # MONOCHROME1: low values are white; flip so bone is bright.
  return out


def read_dicom(path: str, *, window: tuple[float, float] | None = None) -> np.ndarray:
  """Returns all frames as float32 in [0, 1]: (F, H, W) or (F, H, W, 3); F = 1 for single frames.

  Args:
    path: a DICOM file.
    window: (center, width) in modality units (e.g. Hounsfield) overriding the file's VOI.
  """
  path = os.fspath(path)
  ds = _read_dataset(path)
  _promote_shared_functional_groups(ds)
  pixels = _decode(ds, path)
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  samples = int(ds.get("SamplesPerPixel", 1) or 1)
  if samples == 1:
    if frames == 1:
      pixels = pixels[None]
    if pixels.ndim != 3:
      raise MedjaxError(f"{path}: unexpected grayscale pixel array shape {pixels.shape}")
    return _grayscale_to_unit(pixels, ds, window, path)
  if samples != 3:
    raise MedjaxError(f"{path}: SamplesPerPixel={samples} is not supported (expected 1 or 3)")
  if frames == 1:
    pixels = pixels[None]
  if pixels.ndim != 4:
    raise MedjaxError(f"{path}: unexpected color pixel array shape {pixels.shape}")
  # pydicom converts YBR to RGB; color values are already display values.
  bits = int(ds.get("BitsStored", 8) or 8)
  return np.clip(pixels.astype(np.float64) / (2 ** bits - 1), 0.0, 1.0).astype(np.float32)
