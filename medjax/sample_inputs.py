"""`python -m medjax.sample`'s inputs beyond the prompt: an init image and mask (img2img and
inpainting, diffusers' semantics) and an embedding interpolation, each checked before the model
loads so a bad flag costs one `error:` line and writes nothing.

A DICOM `--image` is only read for its pixels: the PNG metadata records the file's basename,
never a tag of it, so no patient identifier reaches a generated image.
"""
import dataclasses
import math
from pathlib import Path

import numpy as np

from medjax.data.loader import resize_to
from medjax.data.read_image import read_image
from medjax.errors import MedjaxError
from medjax.images import rgb_in_unit_range
from medjax.sampling import parse_prompt

# Defaults of --strength: img2img 0.75 (diffusers' img2img class says 0.8; issue 17 chose 0.75),
# inpainting 1 as StableDiffusionInpaintPipeline (the masked region starts from pure noise).
IMG2IMG_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0
MAX_INTERPOLATION = 64  # images in one strip: it stays a viewable picture
# ITU-R 601 luma, as PIL's convert("L") that diffusers' mask processor applies to an RGB mask.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class InitImage:
  """The img2img / inpainting start, at the file's size (resized once the model is known)."""
  image: np.ndarray  # (H, W, 3) float32 in [0, 1]
  mask: np.ndarray | None  # (H, W, 1) float32 in [0, 1]; white (>= 0.5) = repaint
  strength: float
  metadata: dict  # init_image, mask (basenames), strength, frame: for the PNGs


def check_strength(strength: float | None, steps: int, *, has_image: bool,
                   has_mask: bool) -> float:
  """--strength as diffusers: in (0, 1], and at least one of the `steps` must run."""
  if strength is None:
    return INPAINT_STRENGTH if has_mask else IMG2IMG_STRENGTH
  if not has_image:
    raise MedjaxError(f"--strength = {strength} needs --image (img2img or inpainting)")
  if not math.isfinite(strength) or not 0 < strength <= 1:
    raise MedjaxError(f"--strength = {strength}; expected a number in (0, 1] (1 = start from "
                      "pure noise, small = stay close to --image)")
  if int(steps * strength) < 1:
    raise MedjaxError(f"--strength = {strength} with --steps = {steps} runs no denoising step "
                      "(diffusers runs int(steps * strength) of them); raise --steps or "
                      "--strength")
  return float(strength)


def _read(path: str, flag: str, frame: int | None) -> np.ndarray:
  if not Path(path).is_file():
    raise MedjaxError(f"--{flag}={path}: no such file")
  try:
    return read_image(path, frame=frame)
  except MedjaxError as e:
    raise MedjaxError(f"--{flag}: {e}") from None


def read_init_image(image: str, mask: str, strength: float | None, steps: int,
                    frame: int | None = None) -> InitImage | None:
  """Reads and checks --image and --mask (None without --image).

  Raises:
    MedjaxError: a missing or unreadable file, a mask without an image, of another size or
    with nothing white in it, or a bad strength.
  """
  if mask and not image:
    raise MedjaxError(f"--mask={mask} needs --image (the image to inpaint)")
  strength = check_strength(strength, steps, has_image=bool(image), has_mask=bool(mask))
  if not image:
    if frame is not None:
      raise MedjaxError(f"--frame = {frame} needs --image (a slice of a volume)")
    return None
  pixels = rgb_in_unit_range(_read(image, "image", frame))
  meta = {"init_image": Path(image).name, "strength": strength}
  if frame is not None:
    meta["frame"] = frame
  if not mask:
    return InitImage(pixels, None, strength, meta)
  m = _read(mask, "mask", frame)
  if m.ndim == 3:
    m = m[..., :3] @ _LUMA if m.shape[-1] >= 3 else m[..., 0]
  if m.shape != pixels.shape[:2]:
    raise MedjaxError(f"--mask={mask}: {m.shape[0]}x{m.shape[1]} pixels but --image={image} is "
                      f"{pixels.shape[0]}x{pixels.shape[1]}; expected the same size")
  if not np.any(m >= 0.5):
    raise MedjaxError(f"--mask={mask}: no white pixel (>= half of full scale), so nothing to "
                      "repaint; white = repaint, black = keep")
  meta["mask"] = Path(mask).name
  return InitImage(pixels, m[..., None].astype(np.float32), strength, meta)


def check_square(height: int, width: int) -> None:
  """An init image is centre-cropped to a square (`resize_to`): the output must be square."""
  if height and width and height != width:
    raise MedjaxError(f"--height = {height}, --width = {width}: --image is centre-cropped to a "
                      "square and resized (medjax.data.loader.resize_to); expected height == "
                      "width")


def resize_init(init: InitImage, size: int,
                vae_factor: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(image (size, size, 3), mask (size, size, 1) or None): centre crop, Lanczos resize.

  Raises:
    MedjaxError if the mask's white region vanishes at the latent resolution (the sampler reads
    every `vae_factor`-th pixel), which would return the image unchanged.
  """
  image = resize_to(init.image, size)
  if init.mask is None:
    return image, None
  mask = resize_to(init.mask, size)
  if not np.any(mask[::vae_factor, ::vae_factor] >= 0.5):
    raise MedjaxError(f"--mask={init.metadata['mask']}: its white region vanishes at "
                      f"{size}x{size} pixels seen every {vae_factor}th pixel (the latent grid); "
                      "expected a larger region")
  return image, mask


@dataclasses.dataclass(frozen=True)
class Interpolation:
  """--interpolate=A,B,K: K images from --prompt to --prompt with B in place of A."""
  a: str
  b: str
  k: int
  prompt_b: str

  @property
  def weights(self) -> list[float]:
    """0 = --prompt, 1 = prompt_b, evenly spaced."""
    return [float(w) for w in np.linspace(0.0, 1.0, self.k)]


def parse_interpolate(spec: str, prompt: str, *, num_images: int | None,
                      has_image: bool) -> Interpolation | None:
  """--interpolate's 'A,B,K' checked against the other flags (None when not given)."""
  if not spec:
    return None
  fields = [f.strip() for f in spec.split(",")]
  if len(fields) != 3 or not fields[0] or not fields[1]:
    raise MedjaxError(f"--interpolate={spec}: expected 'A,B,K' (A in --prompt, B to put in its "
                      "place, K images)")
  a, b, k = fields
  try:
    k = int(k)
  except ValueError:
    raise MedjaxError(f"--interpolate={spec}: K = {k!r}; expected an integer >= 2") from None
  if not 2 <= k <= MAX_INTERPOLATION:
    raise MedjaxError(f"--interpolate={spec}: K = {k}; expected 2 <= K <= {MAX_INTERPOLATION}")
  if a == b:
    raise MedjaxError(f"--interpolate={spec}: A and B are the same; expected two texts")
  if a not in prompt:
    raise MedjaxError(f"--interpolate={spec}: --prompt {prompt!r} does not contain {a!r}; "
                      "expected A in it (B takes its place at the other end)")
  parts = parse_prompt(prompt)
  if len(parts) > 1 or parts[0][1] != 1:
    raise MedjaxError(f"--interpolate={spec}: --prompt {prompt!r} is composable (AND or "
                      ":weight); expected a plain prompt")
  if has_image:
    raise MedjaxError("--interpolate with --image is not supported; expected one of them")
  if num_images not in (None, 1):
    raise MedjaxError(f"--interpolate makes one strip from one seed; --num_images = "
                      f"{num_images}, expected 1 or none (use --seed for another strip)")
  return Interpolation(a, b, k, prompt.replace(a, b))
