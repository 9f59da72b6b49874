"""python -m medjax.sample's --image/--mask/--strength and --interpolate, in process
(`medjax.sample.run_sample`) on the embedded tiny model, plus one subprocess for the error line.

Every generation here is batch 2 with 2 denoising steps (txt2img --steps=2, img2img --steps=4
--strength=0.5), so they share one compiled graph. Tolerances: float images 1e-5 max abs
(measured 0); PNGs within one uint8 level of `to_uint8` of `sd.generate`'s images (rounding of
floats that agree to ~1e-6 may cross a level).
"""
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medjax import StableDiffusion
from medjax import sample
from medjax import sampling
from medjax.convert.embeddings import write_diffusers_embeddings
from medjax.data.loader import resize_to
from medjax.errors import MedjaxError
from medjax.images import to_uint8
from medjax.sample_inputs import parse_interpolate

ROOT = Path(__file__).resolve().parents[1]
HEALTHY = "a prostate mri with <healthy-prostate>"
INTERPOLATE = "<healthy-prostate>,<cspca>,"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two textual-inversion files, an 80x96 grayscale PNG and a lesion mask for it."""
  d = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(0)
  for name, token in (("healthy", "<healthy-prostate>"), ("cspca", "<cspca>")):
    vectors = rng.standard_normal((2, 32)).astype(np.float32)
    write_diffusers_embeddings(d / f"{name}.safetensors", {token: vectors})
  Image.fromarray(rng.integers(0, 256, (80, 96), dtype=np.uint8)).save(d / "slice.png")
  mask = np.zeros((80, 96), np.uint8)
  mask[24:56, 40:72] = 255
  Image.fromarray(mask).save(d / "lesion.png")
  return d


@pytest.fixture(scope="module")
def base():
  """Random weights: the random 2-vector tokens move its images far (the trained model, which
  knows only its four prompts, hardly reacts to them)."""
  return StableDiffusion.embedded(pretrained=False, seed=0)


@pytest.fixture(scope="module")
def sd(files, base):
  return base.load_embeddings([files / "healthy.safetensors", files / "cspca.safetensors"])


@pytest.fixture
def reuse_base(monkeypatch, base):
  """run_sample's `StableDiffusion.load("")` returns the module's embedded model (the same
  weights, built once; load_embeddings leaves it unchanged)."""
  def load(pretrained, **kwargs):
    assert pretrained == "" and kwargs == {"allow_pickle": False}
    return base
  monkeypatch.setattr(sample.StableDiffusion, "load", load)


def _png(path):
  return np.asarray(Image.open(path)).astype(np.int16)


def _within_one_level(png, images):
  return int(np.abs(_png(png) - to_uint8(images).astype(np.int16)).max()) <= 1


def test_interpolation_ends_are_the_plain_prompts(files, sd):
  """K=2: the two images are the plain prompts' images with the same seed (floats)."""
  interp = parse_interpolate(INTERPOLATE + "2", HEALTHY, num_images=None, has_image=False)
  assert interp.prompt_b == "a prostate mri with <cspca>" and interp.weights == [0.0, 1.0]
  row = sampling.interpolation_row(sd, HEALTHY, interp.prompt_b, interp.weights, seed=5,
                                   num_inference_steps=2)
  plain = sd.generate([HEALTHY, interp.prompt_b], num_inference_steps=2, seed=[5, 5])
  assert np.abs(row - plain).max() <= 1e-5
  assert np.abs(plain[0] - plain[1]).max() > 1e-2  # the two tokens do change the image


@pytest.mark.usefixtures("reuse_base")
def test_interpolation_strip_on_disk(files, sd, tmp_path):
  out = tmp_path / "strip"
  paths, _ = sample.run_sample(
      outdir=out, prompt=HEALTHY, interpolate=INTERPOLATE + "4", steps=2, batch_size=2,
      seed=5, embeddings=[files / "healthy.safetensors", files / "cspca.safetensors"])
  names = [f"sample_{i:04d}.png" for i in range(4)] + ["strip.png"]
  assert [p.name for p in paths] == names and sorted(os.listdir(out)) == sorted(names)
  singles = [_png(p) for p in paths[:4]]
  np.testing.assert_array_equal(_png(paths[-1]), np.concatenate(singles, axis=1))
  # The ends are the plain prompts' images; the middle is neither.
  plain = sd.generate([HEALTHY, "a prostate mri with <cspca>"], num_inference_steps=2,
                      seed=[5, 5])
  assert _within_one_level(paths[0], plain[0]) and _within_one_level(paths[3], plain[1])
  for middle in singles[1:3]:
    assert min(np.abs(middle - singles[0]).max(), np.abs(middle - singles[3]).max()) > 3
  text = Image.open(paths[1]).text
  assert text["synthetic"] == "true" and text["seed"] == "5"
  assert text["prompt"] == HEALTHY and text["prompt_b"] == "a prostate mri with <cspca>"
  assert text["interpolation_weight"] == "0.333333"
  assert Image.open(paths[-1]).text["interpolation_weights"] == "0, 0.333333, 0.666667, 1"


@pytest.mark.usefixtures("reuse_base")
def test_inpainting_writes_what_generate_makes(files, sd, tmp_path):
  paths, _ = sample.run_sample(
      outdir=tmp_path / "out", prompt="a prostate mri with <cspca>", image=str(files / "slice.png"),
      mask=str(files / "lesion.png"), strength=0.5, steps=4, num_images=2, batch_size=2,
      seed=3, embeddings=[files / "cspca.safetensors"])
  gray = np.asarray(Image.open(files / "slice.png"), np.float32)[..., None] / 255
  image = resize_to(np.repeat(gray, 3, axis=-1), 64)
  mask = resize_to(np.asarray(Image.open(files / "lesion.png"), np.float32)[..., None] / 255, 64)
  want = sd.generate(["a prostate mri with <cspca>"] * 2, num_inference_steps=4, seed=[3, 4],
                     image=image, mask=mask, strength=0.5)
  assert _within_one_level(paths[0], want[0]) and _within_one_level(paths[1], want[1])
  text = Image.open(paths[1]).text
  assert (text["init_image"], text["mask"], text["strength"], text["seed"],
          text["synthetic"]) == ("slice.png", "lesion.png", "0.5", "4", "true")


@pytest.mark.usefixtures("reuse_base")
def test_dicom_image_records_no_patient_identifier(tmp_path):
  path = get_testdata_file("MR_small.dcm")
  if path is None:
    pytest.skip("pydicom sample MR_small.dcm not available")
  ds = pydicom.dcmread(path)
  ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "SECRET123", "19700101"
  ds.save_as(tmp_path / "IM0001.dcm")
  paths, _ = sample.run_sample(outdir=tmp_path / "out", prompt="a prostate mri",
                               image=str(tmp_path / "IM0001.dcm"), strength=0.5, steps=4,
                               num_images=2, batch_size=2)
  for p in paths:
    raw = p.read_bytes()
    assert b"Doe" not in raw and b"SECRET123" not in raw and b"19700101" not in raw
    text = Image.open(p).text
    assert text["init_image"] == "IM0001.dcm" and text["synthetic"] == "true"


@pytest.fixture
def no_model(monkeypatch):
  """Loading a model fails the test: these inputs must be refused before it."""
  def load(*args, **kwargs):
    raise AssertionError("the model was loaded")
  monkeypatch.setattr(sample.StableDiffusion, "load", load)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image="missing.png"), "--image=.*missing.png: no such file"),
    (dict(image="corrupt.png"), "--image: .*corrupt.png: not a readable image"),
    (dict(image="slice.png", mask="missing.png"), "--mask=.*missing.png: no such file"),
    (dict(mask="lesion.png"), "--mask=.*lesion.png needs --image"),
    (dict(image="slice.png", mask="corrupt.png"), "--mask: .*corrupt.png: not a readable image"),
    (dict(image="slice.png", mask="small.png"), "small.png: 40x48 pixels but --image=.* is "
                                                "80x96"),
    (dict(image="slice.png", mask="black.png"), "black.png: no white pixel"),
    (dict(image="slice.png", strength=0.0), "--strength = 0.0; expected a number in \\(0, 1\\]"),
    (dict(image="slice.png", strength=1.5), "--strength = 1.5"),
    (dict(image="slice.png", strength=float("nan")), "--strength = nan"),
    (dict(strength=0.5), "--strength = 0.5 needs --image"),
    (dict(image="slice.png", strength=0.2, steps=4), "runs no denoising step"),
    (dict(image="slice.png", frame=2), "--image: .*frame=2 requested from a single 2D image"),
    (dict(image="slice.png", height=64, width=128), "expected height == width"),
    (dict(interpolate=INTERPOLATE + "1"), "K = 1; expected 2 <= K <= 64"),
    (dict(interpolate=INTERPOLATE + "x"), "K = 'x'; expected an integer"),
    (dict(interpolate="<healthy-prostate>,8"), "expected 'A,B,K'"),
    (dict(interpolate="<cspca>,<healthy-prostate>,4"), "does not contain '<cspca>'"),
    (dict(interpolate=INTERPOLATE + "4", prompt=HEALTHY + ":0.5 AND x"), "is composable"),
    (dict(interpolate=INTERPOLATE + "4", image="slice.png"), "with --image is not supported"),
    (dict(interpolate=INTERPOLATE + "4", num_images=3), "--num_images = 3, expected 1"),
])
def test_bad_inputs_fail_before_the_model_loads(files, tmp_path, no_model, kwargs, match):
  (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
  Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "small.png")
  Image.fromarray(np.full((80, 96), 100, np.uint8)).save(tmp_path / "black.png")
  for key in ("image", "mask"):  # names relative to the files folder, or written here
    if key in kwargs:
      name = kwargs[key]
      kwargs[key] = str(files / name if (files / name).exists() else tmp_path / name)
  kwargs = {"prompt": HEALTHY, "steps": 4, **kwargs}
  with pytest.raises(MedjaxError, match=match):
    sample.run_sample(outdir=tmp_path / "out", **kwargs)
  assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("reuse_base")
def test_mask_too_small_for_the_latent_grid(tmp_path):
  """Refused once the model's VAE factor is known: one white pixel between the sampled ones
  would leave the image unchanged, a near copy of a patient's image marked synthetic."""
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "slice.png")
  mask = np.zeros((64, 64), np.uint8)
  mask[3, 3] = 255
  Image.fromarray(mask).save(tmp_path / "dot.png")
  with pytest.raises(MedjaxError, match="dot.png: its white region vanishes at 64x64"):
    sample.run_sample(outdir=tmp_path / "out", prompt="x", image=str(tmp_path / "slice.png"),
                      mask=str(tmp_path / "dot.png"), steps=4)
  assert not (tmp_path / "out").exists()


def test_cli_interpolate_without_a_in_the_prompt_is_one_error_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(
      [sys.executable, "-m", "medjax.sample", "--prompt=a chest x-ray",
       "--interpolate=lung,heart,8", f"--outdir={tmp_path / 'out'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1:] == [
      "error: --interpolate=lung,heart,8: --prompt 'a chest x-ray' does not contain 'lung'; "
      "expected A in it (B takes its place at the other end)"]
  assert not (tmp_path / "out").exists()
