"""Image arrays as pictures: [0, 1] floats to uint8, grids, PNGs with provenance metadata.

Every PNG medjax generates carries tEXt metadata (synthetic=true, generator, prompt, ...) so a
generated image is never mistaken for a patient's.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from medjax.atomic import atomic_path


def to_uint8(images) -> np.ndarray:
  return np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path, metadata: dict) -> None:
  """Writes a PNG with tEXt metadata atomically (temp file, then rename)."""
  info = PngInfo()
  for key, value in metadata.items():
    info.add_text(key, str(value))
  with atomic_path(path) as tmp:
    Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)


def grid(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one image, ceil(sqrt(N)) columns, black padding."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    out[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return out


def rgb_in_unit_range(image: np.ndarray) -> np.ndarray:
  """(H, W) or (H, W, 1|3) in [0, 1] -> (H, W, 3) float32."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
