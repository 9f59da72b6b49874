"""Procedural medical images: the embedded default data set and the test data.

They are not meant to fool anyone; they give every loader, the pipeline and training a signal
with the right structure: a chest X-ray phantom whose pleural effusion is a basal opacity with a
meniscus (the paper-A target class) and a 3-channel prostate MRI (T2W, ADC, HBV) whose lesion is
dark on ADC and bright on HBV, with exact labels. Same seed, same image, at any size.
"""
import numpy as np
from PIL import Image
from scipy import ndimage

Size = int | tuple[int, int]
_RENDER_MAX = 256

CXR_FINDINGS = ("Pleural Effusion", "Cardiomegaly")


def _hw(size: Size) -> tuple[int, int]:
  height, width = (size, size) if isinstance(size, (int, np.integer)) else size
  if height < 8 or width < 8:
    raise ValueError(f"phantom size {size} is too small (minimum 8 x 8)")
  return int(height), int(width)


def _inside(distance: np.ndarray, edge: float) -> np.ndarray:
  """Soft indicator: ~1 where distance < 0, ~0 where > 0, blurred over `edge`."""
  return (1.0 / (1.0 + np.exp(np.clip(distance / edge, -50.0, 50.0)))).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sigma_fraction: float) -> np.ndarray:
  """Smooth zero-mean, unit-std noise whose grain is a fixed fraction of the image size."""
  noise = rng.standard_normal(shape, dtype=np.float32)
  smooth = ndimage.gaussian_filter(noise, sigma=max(sigma_fraction * min(shape), 0.5),
                                   mode="reflect")
  return (smooth - smooth.mean()) / (smooth.std() + 1e-8)


def chest_xray(size: Size, *, seed: int, effusion: bool = False, effusion_side: str = "right",
               cardiomegaly: bool = False) -> np.ndarray:
  """A frontal (PA) chest X-ray phantom, float32 (H, W) in [0, 1], patient's right on the left.

  Args:
    size: int or (height, width) in pixels.
    seed: anatomy jitter and noise.
    effusion: add a pleural effusion: basal opacity with a meniscus rising laterally, blunting the
      costophrenic angle.
    effusion_side: 'right', 'left' or 'both' (patient sides).
    cardiomegaly: enlarge the heart so the cardiothoracic ratio exceeds 0.5.
  """
  height, width = _hw(size)
  rng = np.random.default_rng(seed)
  # Anatomy is smooth: render it at most _RENDER_MAX pixels and upsample (Lanczos); only the
  # noise is drawn at full size. This keeps 512 x 512 phantoms cheap enough to train on.
  scale = min(1.0, _RENDER_MAX / max(height, width))
  render_h, render_w = max(8, round(height * scale)), max(8, round(width * scale))
  image = _chest_xray_anatomy(render_h, render_w, rng, effusion, effusion_side, cardiomegaly)
  if (render_h, render_w) != (height, width):
    image = _upsample(image, height, width)
  image += 0.006 * rng.standard_normal((height, width), dtype=np.float32)
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def _upsample(image: np.ndarray, height: int, width: int) -> np.ndarray:
  return np.array(Image.fromarray(image.astype(np.float32)).resize(
      (width, height), Image.Resampling.LANCZOS))


def _chest_xray_anatomy(height: int, width: int, rng: np.random.Generator, effusion: bool,
                        effusion_side: str, cardiomegaly: bool) -> np.ndarray:
  def j(scale: float) -> float:  # anatomical jitter
    return rng.normal(0.0, scale)

  y, x = np.meshgrid(np.linspace(-1, 1, height, dtype=np.float32),
                     np.linspace(-1, 1, width, dtype=np.float32), indexing="ij")
  edge = 2.0 / min(height, width)

  body = _inside((np.abs(x) / (0.93 + j(0.02))) ** 3 + (np.abs(y - 0.1) / 1.25) ** 3 - 1.0, 0.03)
  image = 0.04 + 0.40 * body + 0.08 * body * np.clip(y - 0.2, 0, 1)  # abdomen denser

  spine_half = 0.065 + j(0.005)
  mediastinum_half = 0.13 + j(0.01) + 0.05 * np.clip(y + 0.2, 0, 1)
  lung_base = 0.55 + j(0.03)
  lungs = np.zeros_like(x)
  effusion_map = np.zeros_like(x)
  sides = {"right": (-1,), "left": (1,), "both": (-1, 1)}[effusion_side] if effusion else ()
  for side in (-1, 1):  # -1: image left = patient right
    cx, cy = side * (0.43 + j(0.015)), -0.05 + j(0.02)
    rx, ry = 0.3 + j(0.01), 0.68 + j(0.02)
    taper = 0.45 + 0.55 * np.clip((y - (cy - ry)) / 0.6, 0.0, 1.0)  # narrow apex
    shape = (np.abs(x - cx) / (rx * taper + 1e-6)) ** 2.2 + (np.abs(y - cy) / ry) ** 2.2 - 1.0
    dome = lung_base - 0.13 * (1.0 - np.clip(((x - cx) / rx) ** 2, 0, 1)) + 0.1 * (side > 0)
    lung = _inside(shape, 0.04) * _inside(y - dome, edge + 0.01)
    lung *= _inside(mediastinum_half - np.abs(x), edge + 0.01)
    lungs = np.maximum(lungs, lung)
    fluid_height = 0.14 + 0.1 * rng.random()  # drawn always: findings never shift anatomy
    if side in sides:
      level = dome.min() - fluid_height  # fluid surface near the medial side
      lateral = np.clip(side * (x - cx) / rx, -1.0, 1.0)  # -1 medial .. +1 lateral
      meniscus = level - 0.06 * (lateral + 1.0) ** 2  # rises towards the chest wall
      effusion_map = np.maximum(effusion_map, lung * _inside(meniscus - y, 0.015 + edge))

  vessels = np.clip(_texture(rng, (height, width), 0.012), 0, None)
  image = image - 0.30 * lungs + 0.035 * lungs * vessels * (1.0 - 0.4 * np.abs(x))

  heart_scale = (1.35 if cardiomegaly else 1.0) * (1.0 + j(0.03))
  heart = _inside(((x - 0.1) / (0.31 * heart_scale)) ** 2 + ((y - 0.24) / 0.25) ** 2 - 1.0, 0.03)
  mediastinum = (_inside(np.abs(x) - mediastinum_half, edge + 0.01)
                 * _inside(y - 0.35, 0.03) * _inside(-0.98 - y, 0.02))
  soft = np.maximum(heart, mediastinum)
  image = image * (1.0 - soft) + soft * (0.58 + 0.05 * body)

  vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y + j(0.02)) / 0.13)
  spine = _inside(np.abs(x) - spine_half, edge + 0.005) * body
  image += 0.09 * spine * (0.6 + 0.4 * vertebrae)

  ribs = np.zeros_like(x)
  rib_width = 0.022 + j(0.002)
  for k in range(10):
    t = np.clip((np.abs(x) - spine_half) / 0.8, 0.0, 1.0)
    centre = -0.78 + k * 0.135 + j(0.01) - 0.16 * np.sin(np.pi * t) + 0.22 * t
    along = _inside(spine_half - np.abs(x), edge) * _inside(np.abs(x) - 0.9, 0.02)
    ribs = np.maximum(ribs, np.exp(-((y - centre) / rib_width) ** 2) * along)
  clavicle_y = -0.74 + j(0.01) - 0.14 * np.clip((np.abs(x) - 0.1) / 0.5, 0, 1)
  clavicles = np.exp(-((y - clavicle_y) / 0.025) ** 2) * _inside(np.abs(x) - 0.62, 0.02)
  clavicles *= _inside(0.09 - np.abs(x), 0.01)
  image += (0.13 * ribs + 0.16 * clavicles) * body

  image = image * (1.0 - effusion_map) + effusion_map * (0.5 + 0.04 * vessels)
  return image + 0.012 * _texture(rng, (height, width), 0.004)


def chest_xray_labels(effusion: bool, cardiomegaly: bool) -> dict[str, float]:
  """CheXpert-style labels of a phantom (findings it does not draw are negative)."""
  return {"No Finding": float(not (effusion or cardiomegaly)),
          "Pleural Effusion": float(effusion), "Cardiomegaly": float(cardiomegaly)}


# ----------------------------------------------------------------------------- prostate MRI


def _prostate_parameters(seed: int, lesion: bool) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  p = {
      "gland": np.array([18.0, 17.0, 22.0]) * (1.0 + rng.normal(0, 0.06, 3)),  # z, y, x radii mm
      "offset": rng.normal(0, 2.0, 3),
      "waves": rng.normal(0, 1.0, (6, 3)) * 0.25,  # texture wave vectors (1/mm)
      "phases": rng.uniform(0, 2 * np.pi, 6),
      "lesion": np.zeros(3),
      "lesion_radii": np.zeros(3),
  }
  if lesion:
    side = rng.choice([-1.0, 1.0])
    # Peripheral zone: posterior (+y in LPS) and lateral, mid-gland.
    p["lesion"] = np.array([rng.uniform(-6, 6), rng.uniform(7, 10), side * rng.uniform(5, 11)])
    p["lesion_radii"] = np.array([rng.uniform(5, 8), rng.uniform(4, 6), rng.uniform(5, 8)])
  return p


def prostate_mri_sample(z: np.ndarray, y: np.ndarray, x: np.ndarray, *, seed: int,
                        lesion: bool) -> dict[str, np.ndarray]:
  """Evaluates the prostate phantom at physical points (mm, LPS, gland centre near 0).

  Because it is a continuous function of position, the T2W, ADC and HBV series can be sampled on
  different grids (as scanners do) and still agree after resampling.

  Returns:
    't2w', 'adc', 'hbv' in [0, 1] and 'mask' (csPCa lesion, bool), broadcast over z, y, x.
  """
  p = _prostate_parameters(seed, lesion)
  z, y, x = np.broadcast_arrays(z - p["offset"][0], y - p["offset"][1], x - p["offset"][2])
  texture = sum(np.cos(w[0] * z + w[1] * y + w[2] * x + phase)
                for w, phase in zip(p["waves"], p["phases"], strict=True)) / 6.0

  rz, ry, rx = p["gland"]
  gland_d = (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2 - 1.0
  gland = _inside(gland_d, 0.08)
  # Transition zone: anterior-central ellipsoid; peripheral zone: the posterior-lateral rest.
  tz = _inside((z / (0.8 * rz)) ** 2 + ((y + 4.0) / (0.6 * ry)) ** 2 + (x / (0.6 * rx)) ** 2 - 1.0,
               0.1) * gland
  pz = np.clip(gland - tz, 0.0, 1.0)
  body = _inside((y / 105.0) ** 2 + (x / 160.0) ** 2 - 1.0, 0.02)
  muscle = sum(_inside(((y + 5.0) / 35.0) ** 2 + ((x - s * 52.0) / 14.0) ** 2 - 1.0, 0.1)
               for s in (-1.0, 1.0))
  bone = sum(_inside(((y + 5.0) / 24.0) ** 2 + ((x - s * 85.0) / 24.0) ** 2 - 1.0, 0.1)
             for s in (-1.0, 1.0))
  rectum_d = ((y - ry - 14.0) / 12.0) ** 2 + (x / 16.0) ** 2 - 1.0
  rectum_wall = _inside(rectum_d, 0.1) - _inside(rectum_d + 0.45, 0.1)
  rectum_lumen = _inside(rectum_d + 0.45, 0.1)
  bladder = _inside(((z - rz - 18.0) / 22.0) ** 2 + ((y + 10.0) / 28.0) ** 2 + (x / 32.0) ** 2
                    - 1.0, 0.1)

  if lesion:
    lz, ly, lx = p["lesion"]
    lrz, lry, lrx = p["lesion_radii"]
    lesion_d = ((z - lz) / lrz) ** 2 + ((y - ly) / lry) ** 2 + ((x - lx) / lrx) ** 2 - 1.0
    lesion_map = _inside(lesion_d, 0.1) * gland
    mask = (lesion_d < 0) & (gland_d < 0)
  else:
    lesion_map = np.zeros_like(gland)
    mask = np.zeros(gland.shape, bool)

  fat = np.clip(body - gland - muscle - bone - bladder - rectum_wall - rectum_lumen, 0.0, 1.0)
  tissues = {  # (T2W, ADC, HBV) per tissue
      "fat": (fat, 0.78, 0.08, 0.03), "muscle": (muscle, 0.28, 0.42, 0.12),
      "bone": (bone, 0.45, 0.30, 0.05), "bladder": (bladder, 0.95, 0.98, 0.04),
      "rectum_wall": (rectum_wall, 0.22, 0.35, 0.2),
      "rectum_lumen": (rectum_lumen, 0.05, 0.1, 0.02),
      "tz": (tz, 0.46, 0.5, 0.22), "pz": (pz, 0.74, 0.7, 0.16),
  }
  t2w = sum(m * v[0] for m, *v in tissues.values())
  adc = sum(m * v[1] for m, *v in tissues.values())
  hbv = sum(m * v[2] for m, *v in tissues.values())
  t2w = t2w * (1.0 + 0.08 * texture * gland + 0.04 * texture)
  adc = adc * (1.0 + 0.05 * texture)
  hbv = hbv * (1.0 + 0.1 * texture)
  # csPCa: T2 hypointense, restricted diffusion (dark ADC), bright high-b-value DWI.
  t2w = t2w * (1.0 - lesion_map) + lesion_map * 0.24
  adc = adc * (1.0 - lesion_map) + lesion_map * 0.16
  hbv = hbv * (1.0 - lesion_map) + lesion_map * 0.92
  out = {name: np.clip(v, 0, 1).astype(np.float32) for name, v in (("t2w", t2w), ("adc", adc),
                                                                   ("hbv", hbv))}
  out["mask"] = mask
  return out


def prostate_mri(size: Size, *, seed: int, lesion: bool = False,
                 field_of_view_mm: float = 150.0) -> np.ndarray:
  """An axial prostate MRI slice phantom, float32 (H, W, 3) = (T2W, ADC, HBV) in [0, 1].

  The default field of view matches PI-CAI's 300 x 300 crop at 0.5 mm. With `lesion` the slice
  passes through the lesion centre, so it is labelled diseased.
  """
  height, width = _hw(size)
  rng = np.random.default_rng(seed + 7919)
  p = _prostate_parameters(seed, lesion)
  z = (p["lesion"][0] if lesion else rng.uniform(-8.0, 8.0)) + p["offset"][0]
  scale = min(1.0, _RENDER_MAX / max(height, width))
  render_h, render_w = max(8, round(height * scale)), max(8, round(width * scale))
  half_h = field_of_view_mm / 2 * height / max(height, width)
  half_w = field_of_view_mm / 2 * width / max(height, width)
  y, x = np.meshgrid(np.linspace(-half_h, half_h, render_h, dtype=np.float32),
                     np.linspace(-half_w, half_w, render_w, dtype=np.float32), indexing="ij")
  fields = prostate_mri_sample(np.full_like(y, z), y, x, seed=seed, lesion=lesion)
  channels = [fields[name] for name in ("t2w", "adc", "hbv")]
  if (render_h, render_w) != (height, width):
    channels = [_upsample(c, height, width) for c in channels]
  image = np.stack(channels, axis=-1)
  image += 0.015 * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image, 0.0, 1.0).astype(np.float32)
