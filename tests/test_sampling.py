"""medjax.sampling vs diffusers' Stable Diffusion pipelines (fp32, tiny random models).

Tolerance 1e-3 max abs on images in [0, 1]; measured: txt2img DDIM 1.4e-5 (SD1), PNDM
v-prediction 2.6e-5 (SD2), img2img 1.3e-5, inpainting 2.0e-5 (at strength 0.75: 2.3e-5),
9-channel inpainting 1.1e-5 (Euler and DPM-Solver++ txt2img, checked by hand: 1.3e-5, 1.1e-5).
Most tests share one compiled graph (SD1, DDIM, 2 images, 3 steps) to keep the file fast.
"""
import os
from pathlib import Path
import subprocess
import sys

import jax
import numpy as np
import pytest

from medjax import StableDiffusion, sampling
from medjax.errors import MedjaxError
from tests import tiny_diffusers

TOL = 1e-3
PROMPTS = ["a chest x-ray with pleural effusion", "a healthy prostate mri"]
NEGATIVE = ["blurry", ""]


def _noise(seed, shape=(2, 8, 8, 4)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(x):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _diffusers(pipe, pipeline_class: str, scheduler_class: str, unet=None, **kwargs):
  """Runs a diffusers pipeline class built from `pipe`'s components with another scheduler.

  clip_sample is off as the txt2img and img2img pipelines force it (the inpaint one does not).
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  sch = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config, clip_sample=False)
  components = {**pipe.components, "scheduler": sch, "unet": unet or pipe.unet}
  p = getattr(diffusers, pipeline_class)(**components)
  p.set_progress_bar_config(disable=True)
  return p(**kwargs, output_type="np").images


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """One thread: the diffusers runs take milliseconds, and two OpenMP threads on two busy cores
  can spin-wait for seconds per call."""
  import torch  # pylint: disable=g-import-not-at-top
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  path = tmp_path_factory.mktemp("sd1") / "pipe"
  pipe = tiny_diffusers.make_pipeline_dir(path, style="sd1")
  return pipe, StableDiffusion.from_pretrained(path)


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(5).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)


def test_txt2img_ddim_matches_diffusers(sd1):
  pipe, sd = sd1
  lat = _noise(0)
  want = _diffusers(pipe, "StableDiffusionPipeline", "DDIMScheduler",
                    prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=3,
                    guidance_scale=7.5, latents=_nchw(lat))
  got = sd.generate(PROMPTS, NEGATIVE, num_inference_steps=3, scheduler="ddim", latents=lat)
  assert got.shape == (2, 64, 64, 3) and got.dtype == np.float32
  assert tiny_diffusers.max_abs(got, want) <= TOL


@pytest.mark.slow(reason="builds and compiles a second model (~18 s on 2 CPU cores); the "
                  "scheduler tests cover PNDM and v-prediction step by step")
def test_txt2img_pndm_v_prediction_matches_diffusers(tmp_path):
  pipe = tiny_diffusers.make_pipeline_dir(tmp_path / "pipe", style="sd2")
  sd = StableDiffusion.from_pretrained(tmp_path / "pipe")
  assert sd.scheduler_config["prediction_type"] == "v_prediction"
  lat = _noise(1, (1, 8, 8, 4))
  want = _diffusers(pipe, "StableDiffusionPipeline", "PNDMScheduler",
                    prompt=PROMPTS[:1], negative_prompt=NEGATIVE[:1], num_inference_steps=3,
                    guidance_scale=5.0, latents=_nchw(lat))
  got = sd.generate(PROMPTS[:1], NEGATIVE[:1], num_inference_steps=3, guidance_scale=5.0,
                    scheduler="pndm", latents=lat)
  assert tiny_diffusers.max_abs(got, want) <= TOL


def test_img2img_matches_diffusers(sd1, image):
  """diffusers takes our VAE latents as its image (its own encode would sample the posterior)."""
  import torch  # pylint: disable=g-import-not-at-top
  pipe, sd = sd1
  z = np.asarray(sd.encode_images(image * 2 - 1))
  want = _diffusers(pipe, "StableDiffusionImg2ImgPipeline", "DDIMScheduler",
                    prompt=PROMPTS, negative_prompt=NEGATIVE, image=_nchw(z), strength=0.75,
                    num_inference_steps=4, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(0))
  noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
  got = sd.generate(PROMPTS, NEGATIVE, num_inference_steps=4, scheduler="ddim", image=image,
                    strength=0.75, latents=noise.permute(0, 2, 3, 1).numpy())
  assert tiny_diffusers.max_abs(got, want) <= TOL


def test_inpainting_matches_diffusers(sd1, image):
  """4-channel U-Net: the known region re-noised each step (diffusers' inpaint pipeline)."""
  pipe, sd = sd1
  z = np.asarray(sd.encode_images(image * 2 - 1))
  mask = np.zeros((2, 64, 64, 1), np.float32)
  mask[:, 16:48, 8:40] = 1
  lat = _noise(2)
  want = _diffusers(pipe, "StableDiffusionInpaintPipeline", "DDIMScheduler",
                    prompt=PROMPTS, negative_prompt=NEGATIVE, image=_nchw(z),
                    mask_image=_nchw(mask), masked_image_latents=_nchw(z),
                    num_inference_steps=3, guidance_scale=7.5, latents=_nchw(lat))
  got = sd.generate(PROMPTS, NEGATIVE, num_inference_steps=3, scheduler="ddim", image=image,
                    mask=mask, latents=lat)
  assert tiny_diffusers.max_abs(got, want) <= TOL


def test_inpainting_at_strength_below_one_matches_diffusers(sd1, image):
  """4-channel inpainting from the image noised to strength 0.75 (the CLI's --image --mask
  --strength): diffusers draws the noise from the generator, as in img2img (given `latents=`
  at strength < 1 it would start from that noise alone and drop the image)."""
  import torch  # pylint: disable=g-import-not-at-top
  pipe, sd = sd1
  z = np.asarray(sd.encode_images(image * 2 - 1))
  mask = np.zeros((2, 64, 64, 1), np.float32)
  mask[:, 8:40, 24:56] = 1
  want = _diffusers(pipe, "StableDiffusionInpaintPipeline", "DDIMScheduler",
                    prompt=PROMPTS, negative_prompt=NEGATIVE, image=_nchw(z),
                    mask_image=_nchw(mask), masked_image_latents=_nchw(z), strength=0.75,
                    num_inference_steps=4, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(1))
  noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
  got = sd.generate(PROMPTS, NEGATIVE, num_inference_steps=4, scheduler="ddim", image=image,
                    mask=mask, strength=0.75, latents=noise.permute(0, 2, 3, 1).numpy())
  assert tiny_diffusers.max_abs(got, want) <= TOL
  # The image matters (a start from the noise alone would not depend on it).
  other = sd.generate(PROMPTS, NEGATIVE, num_inference_steps=4, scheduler="ddim",
                      image=image[::-1], mask=mask, strength=0.75,
                      latents=noise.permute(0, 2, 3, 1).numpy())
  assert tiny_diffusers.max_abs(got * mask, other * mask) > 1e-2


def test_one_compile_for_new_prompts_seeds_scales_and_modes(sd1, image):
  _, sd = sd1
  sd.generate(PROMPTS, num_inference_steps=3)
  before = sampling.TRACES["ddim"]
  a = sd.generate(["other", "prompts"], ["x", "y"], num_inference_steps=3, seed=9,
                  guidance_scale=3.0)
  b = sd.generate(["other", "prompts"], ["x", "y"], num_inference_steps=3, seed=9,
                  guidance_scale=3.0)
  c = sd.generate(["other", "prompts"], ["x", "y"], num_inference_steps=3, seed=10,
                  guidance_scale=3.0)
  sd.generate(PROMPTS, num_inference_steps=3, image=image, mask=np.ones((64, 64)))
  sd.generate(PROMPTS, num_inference_steps=4, image=image, strength=0.75)
  assert sampling.TRACES["ddim"] == before
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_inpainting_and_img2img_invariants(sd1, image):
  _, sd = sd1
  lat = _noise(3)
  # All-generate mask at strength 1 is txt2img with the same noise, bit for bit.
  txt = sd.generate(PROMPTS, num_inference_steps=3, latents=lat)
  inp = sd.generate(PROMPTS, num_inference_steps=3, latents=lat, image=image,
                    mask=np.ones((2, 64, 64)))
  np.testing.assert_array_equal(txt, inp)
  # All-known mask: the image's own latents come back, whatever the prompt and noise.
  kept = sd.generate(PROMPTS, num_inference_steps=3, latents=lat, image=image,
                     mask=np.zeros((64, 64, 1)))
  kept2 = sd.generate(PROMPTS[::-1], num_inference_steps=3, seed=1, image=image,
                      mask=np.zeros((2, 64, 64)))
  np.testing.assert_array_equal(kept, kept2)
  assert np.abs(kept - txt).max() > 1e-3
  # Strength 0: nothing to denoise.
  np.testing.assert_array_equal(sd.generate(PROMPTS, image=image, strength=0.0), image)


def test_parse_prompt():
  assert sampling.parse_prompt("healthy:0.3 AND diseased:0.7") == [("healthy", 0.3),
                                                                   ("diseased", 0.7)]
  assert sampling.parse_prompt("a chest x-ray") == [("a chest x-ray", 1.0)]
  assert sampling.parse_prompt("") == [("", 1.0)]
  assert sampling.parse_prompt("a: 2 AND b AND c :-.5") == [("a", 2.0), ("b", 1.0), ("c", -0.5)]
  assert sampling.parse_prompt("time 10:30 AND x:1.") == [("time 10", 30.0), ("x", 1.0)]
  assert sampling.parse_prompt("SAND and band") == [("SAND and band", 1.0)]
  with pytest.raises(MedjaxError, match="empty part"):
    sampling.parse_prompt("a AND ")


def test_composable_weights_one_and_zero_reproduce_the_single_prompt(sd1):
  _, sd = sd1
  images = sd.generate(["a chest x-ray:1 AND pleural effusion:0", "a chest x-ray"],
                       num_inference_steps=3, seed=[4, 4])
  assert tiny_diffusers.max_abs(images[0], images[1]) <= 1e-5
  mixed = sd.generate(["a chest x-ray:0.5 AND pleural effusion:0.5", "a chest x-ray"],
                      num_inference_steps=3, seed=[4, 4])
  assert tiny_diffusers.max_abs(mixed[0], mixed[1]) > 1e-3


def test_interpolation_row_ends_are_the_prompts(sd1):
  _, sd = sd1
  row = sampling.interpolation_row(sd, PROMPTS[0], PROMPTS[1], [0.0, 1.0], seed=6,
                                   num_inference_steps=3)
  ends = sd.generate(PROMPTS, num_inference_steps=3, seed=[6, 6])
  assert tiny_diffusers.max_abs(row, ends) <= 1e-5
  e = sd.encode_prompt(PROMPTS)
  mid = sampling.interpolate_embeddings(e[0], e[1], [0.25])
  np.testing.assert_allclose(mid[0], 0.75 * e[0] + 0.25 * e[1], atol=1e-6)


@pytest.mark.slow(reason="builds and compiles a second model (~20 s on 2 CPU cores)")
def test_nine_channel_inpainting_matches_diffusers(sd1, image, tmp_path):
  """9-channel U-Net: [latents, mask, masked-image latents] in; diffusers is handed our VAE
  latents of the masked image (its own encode would sample the posterior)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  pipe, sd = sd1
  cfg = {**tiny_diffusers.configs("sd1")["unet"], "in_channels": 9}
  unet = tiny_diffusers.randomize_(diffusers.UNet2DConditionModel(**cfg), 3).eval()
  diffusers.StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet}).save_pretrained(
      tmp_path / "inpaint")
  inpaint = StableDiffusion.from_pretrained(tmp_path / "inpaint")
  mask = np.zeros((1, 64, 64, 1), np.float32)
  mask[:, :40] = 1
  masked = np.asarray(sd.encode_images((image[:1] * 2 - 1) * (mask < 0.5)))
  lat = _noise(4, (1, 8, 8, 4))
  want = _diffusers(pipe, "StableDiffusionInpaintPipeline", "DDIMScheduler", unet=unet,
                    prompt=PROMPTS[:1], negative_prompt=NEGATIVE[:1], image=_nchw(masked),
                    mask_image=_nchw(mask), masked_image_latents=_nchw(masked),
                    num_inference_steps=3, guidance_scale=7.5, latents=_nchw(lat))
  got = inpaint.generate(PROMPTS[:1], NEGATIVE[:1], num_inference_steps=3, image=image[:1],
                         mask=mask, latents=lat)
  assert tiny_diffusers.max_abs(got, want) <= TOL
  with pytest.raises(MedjaxError, match="9 input channels"):
    inpaint.generate(PROMPTS[:1], num_inference_steps=2)


@pytest.mark.slow(reason="compiles the graph again with sharding constraints (~12 s)")
def test_one_device_mesh_gives_the_unsharded_images(sd1):
  _, sd = sd1
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  want = sd.generate(PROMPTS, num_inference_steps=3, seed=2)
  got = sd.generate(PROMPTS, num_inference_steps=3, seed=2, mesh=mesh)
  assert tiny_diffusers.max_abs(got, want) <= 1e-6


_TWO_DEVICE_SCRIPT = """
import jax, numpy as np
from medjax import StableDiffusion
assert len(jax.devices()) == 2
sd = StableDiffusion.embedded(0)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
a = sd.generate(["a", "b"], num_inference_steps=2, seed=3)
b = sd.generate(["a", "b"], num_inference_steps=2, seed=3, mesh=mesh)
print(float(np.abs(a - b).max()))
"""


@pytest.mark.slow(reason="a subprocess with two host devices compiles twice (~30 s)")
def test_two_device_mesh_gives_the_unsharded_images():
  root = str(Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": root,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert float(proc.stdout.split()[-1]) <= 1e-4  # measured 5.5e-6 (another partitioning)


def test_mesh_without_the_data_axis(sd1):
  _, sd = sd1
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
  with pytest.raises(MedjaxError, match="mesh axis 'data'"):
    sd.generate(PROMPTS, mesh=mesh)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheduler="heun"), "scheduler name 'heun'"),
    (dict(num_inference_steps=0), "num_inference_steps = 0"),
    (dict(height=60), "height = 60"),
    (dict(width=65), "width = 65"),
    (dict(height=-8), "height = -8"),
    (dict(negative_prompts=["a", "b", "c"]), "3 given for 2 prompts"),
    (dict(image=np.zeros((64, 64, 3)), mask=np.zeros((32, 64))), "mask: size 32x64"),
    (dict(mask=np.zeros((64, 64))), "mask given without image"),
    (dict(strength=0.5), "needs an image"),
    (dict(image=np.zeros((64, 64, 3)), strength=1.5), "strength = 1.5"),
    (dict(latents=np.zeros((2, 8, 8, 3))), "latents: shape"),
    (dict(image=np.full((64, 64, 3), 255.0)), "image: values in \\[255, 255\\]"),
    (dict(seed=[1]), "seed = \\[1\\]"),
    (dict(guidance_scale="7"), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale = nan; expected a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale = inf; expected a finite number"),
    (dict(guidance_scale=-2.0), "guidance_scale = -2.0; expected >= 0"),
    (dict(num_inference_steps=1001), "num_inference_steps = 1001; expected at most the "
                                     "scheduler's num_train_timesteps = 1000"),
])
def test_bad_input(sd1, kwargs, match):
  _, sd = sd1
  with pytest.raises(MedjaxError, match=match):
    sd.generate(PROMPTS, **kwargs)
