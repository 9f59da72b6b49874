"""One entry point that turns any supported medical image file into float32 values in [0, 1].

Every reader returns display-oriented pixels (rows top to bottom, radiological left/right for
volumes) so that downstream code never needs to know where an image came from.
"""
import os

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from medjax.data import dicom
from medjax.data.optional import require
from medjax.errors import MedjaxError

_PILLOW_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NIFTI_EXTS = (".nii", ".nii.gz")
_ITK_EXTS = (".mha", ".mhd", ".nrrd", ".nhdr")
_DICOM_EXTS = (".dcm", ".dicom", ".ima")

Window = tuple[float, float] | None


def _kind(path: str) -> str:
  lower = path.lower()
  for kind, exts in (("pillow", _PILLOW_EXTS), ("nifti", _NIFTI_EXTS), ("itk", _ITK_EXTS),
                     ("dicom", _DICOM_EXTS)):
    if lower.endswith(exts):
      return kind
  with open(path, "rb") as f:  # Extensionless files are usually DICOM (PACS exports).
    head = f.read(132)
  if head[128:132] == b"DICM":
    return "dicom"
  raise MedjaxError(f"{path}: unsupported image file type (expected PNG/JPEG/TIFF, DICOM, NIfTI, "
                    f"MHA/MHD/NRRD)")


def _scale(values: np.ndarray, window: Window) -> np.ndarray:
  """Raw intensities (CT, MRI) have no display range: window if given, else min-max."""
  if window is not None:
    return dicom.apply_window(values, float(window[0]), float(window[1]))
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  if not finite.all():
    values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros(values.shape, np.float32)
  return ((values - lo) / (hi - lo)).astype(np.float32)


def _read_pillow(path: str, window: Window) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image.load()  # Decodes now, so a truncated file fails here rather than silently later.
      mode = image.mode
      if mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("L" if mode in ("LA",) else "RGB")
        mode = image.mode
      if mode == "1":
        image = image.convert("L")
        mode = "L"
      array = np.asarray(image)
  except UnidentifiedImageError:
    raise MedjaxError(f"{path}: not a readable image (Pillow cannot identify it)") from None
  except Image.DecompressionBombError as e:  # a corrupt header, or far larger than any X-ray
    raise MedjaxError(f"{path}: {e} (Pillow's limit: PIL.Image.MAX_IMAGE_PIXELS)") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise MedjaxError(f"{path}: corrupt or truncated image ({e})") from None
  if mode in ("L", "RGB"):
    values, full_scale = array.astype(np.float32), 255.0
  elif mode.startswith("I;16"):
    values, full_scale = array.astype(np.float32), 65535.0
  elif mode == "I":  # 16-bit grayscale PNG opened as 32-bit int by some Pillow builds.
    if array.min() < 0 or array.max() > 65535:
      raise MedjaxError(f"{path}: 32-bit integer image outside the 16-bit range")
    values, full_scale = array.astype(np.float32), 65535.0
  elif mode == "F":
    return _scale(array, window)
  else:
    raise MedjaxError(f"{path}: unsupported Pillow image mode {mode!r}")
  if window is not None:
    return dicom.apply_window(values, float(window[0]), float(window[1]))
  return values / full_scale


def _nifti_to_display(data: np.ndarray) -> np.ndarray:
  """RAS-canonical (x, y, z) -> (z, rows, cols) with anterior up and patient right on the left.

  Matches SimpleITK's LPS array order for axial images, so a volume saved as .nii.gz and as
  .mha reads identically.
  """
  return np.transpose(data[::-1, ::-1, :], (2, 1, 0))


def _read_nifti_volume(path: str) -> np.ndarray:
  nib = require("nibabel", f"{path}: reading a NIfTI file")
  try:
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.get_fdata(dtype=np.float32))
  except Exception as e:  # pylint: disable=broad-except  # nibabel raises many types.
    raise MedjaxError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from None
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
  if data.ndim != 3:
    raise MedjaxError(f"{path}: NIfTI image has {data.ndim} dimensions {data.shape}; expected a "
                      f"2D image or a 3D volume (4D time series are not images)")
  return _nifti_to_display(data)


def _read_itk_volume(path: str) -> np.ndarray:
  sitk = require("SimpleITK", f"{path}: reading an MHA/MHD/NRRD file")
  try:
    image = sitk.ReadImage(path)
  except RuntimeError as e:
    raise MedjaxError(f"{path}: unreadable image ({' '.join(str(e).split())[:300]})") from None
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise MedjaxError(f"{path}: vector images ({image.GetNumberOfComponentsPerPixel()} components) "
                      f"are not supported")
  data = sitk.GetArrayFromImage(image).astype(np.float32)
  if data.ndim == 2:
    data = data[None]
  if data.ndim != 3:
    raise MedjaxError(f"{path}: image has {data.ndim} dimensions {data.shape}; expected 2D or 3D")
  return data


def _check_exists(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MedjaxError(f"{path}: file not found")
  return path


def read_volume(path, *, window: Window = None) -> np.ndarray:
  """Returns a stack of slices/frames, float32 (D, H, W) or (D, H, W, 3), values in [0, 1].

  Intensities of NIfTI/MHA volumes are scaled once over the whole volume so slices stay
  comparable. 2D files give D = 1.
  """
  path = _check_exists(path)
  kind = _kind(path)
  if kind == "dicom":
    return dicom.read_dicom(path, window=window)
  if kind == "pillow":
    return _read_pillow(path, window)[None]
  volume = _read_nifti_volume(path) if kind == "nifti" else _read_itk_volume(path)
  return _scale(volume, window)


def read_image(path, *, frame: int | None = None, window: Window = None) -> np.ndarray:
  """Reads one 2D image as float32 (H, W) or (H, W, 3) with values in [0, 1].

  Args:
    path: PNG/JPEG/TIFF (8 or 16 bit), DICOM, NIfTI (.nii, .nii.gz) or MHA/MHD/NRRD.
    frame: which frame/axial slice of a multi-frame DICOM or 3D volume to return. Required for
      those, since picking one silently would hide a wrong image.
    window: (center, width) in raw/modality units, overriding the file's VOI window.

  Raises:
    MedjaxError naming the file and the problem (missing, truncated, no pixel data, missing
    decoder, unexpected dimensions, ...).
  """
  path = _check_exists(path)
  if _kind(path) == "pillow":
    if frame not in (None, 0):
      raise MedjaxError(f"{path}: frame={frame} requested from a single 2D image")
    return _read_pillow(path, window)
  volume = read_volume(path, window=window)
  if frame is None:
    if volume.shape[0] != 1:
      raise MedjaxError(f"{path}: contains {volume.shape[0]} frames/slices; pass frame=<index> "
                        f"or use read_volume")
    frame = 0
  if not -volume.shape[0] <= frame < volume.shape[0]:
    raise MedjaxError(f"{path}: frame {frame} out of range (file has {volume.shape[0]})")
  return np.ascontiguousarray(volume[frame])
