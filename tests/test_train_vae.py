"""objective='vae': the loss against diffusers' AutoencoderKL, the U-Net and text encoder left
bit-identical through training and export, a rising held-out PSNR, the reconstruction grid,
one-line errors for bad config values, and (slow) exact resume."""
import dataclasses
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medjax import checkpoint as checkpoint_lib
from medjax import objectives
from medjax import sharding
from medjax import trainer
from medjax.convert.diffusers import params_to_state_dict
from medjax.embedded import TINY_VAE_CONFIG
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion
from tests.train_support import run_steps
from tests.train_support import tiny_config

LOSS_RTOL = 1e-4  # fp32 JAX vs fp32 torch, the same weights and noise (measured <= 2e-7)


def vae_config(**overrides):
  return tiny_config("vae", **{"learning_rate": 1e-3, "total_steps": 4,
                               "checkpoint_every_steps": 2, "sample.num_reconstructions": 0,
                               **overrides})


def test_loss_matches_diffusers_autoencoder():
  """rec + w * KL / 3HW from diffusers' forward (posterior.mean + posterior.std * noise, then
  decode) and `DiagonalGaussianDistribution.kl()`, on the embedded VAE's weights; L1 and L2."""
  torch = pytest.importorskip("torch")
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  sd = StableDiffusion.embedded(0)
  params = jax.device_get(sd.params["vae"])
  model = AutoencoderKL(**{k: v for k, v in TINY_VAE_CONFIG.items() if k != "_class_name"})
  model.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_state_dict(params).items()})
  model.eval()
  rng = np.random.default_rng(0)
  images = np.tanh(rng.standard_normal((2, 64, 64, 3))).astype(np.float32)
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  batch = {"image": jnp.asarray(images), "latent_noise": jnp.asarray(noise),
           "weight": jnp.full((2,), 0.5)}

  def both(p, b):  # one compile for both losses; a large KL weight: KL moves the sum
    return [objectives.vae_loss(sd.vae, objectives.VaeLossConfig(loss=name, kl_weight=0.5), p, b)
            for name in ("l1", "l2")]
  got = jax.jit(both)(params, batch)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    posterior = model.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.from_numpy(noise).permute(0, 3, 1, 2)
    rec = model.decode(z).sample
    kl = posterior.kl().numpy()
    rec01 = np.clip((rec.permute(0, 2, 3, 1).numpy() + 1) / 2, 0, 1)
    rec_losses = [(x - rec).abs().mean(dim=(1, 2, 3)).numpy(),
                  ((x - rec) ** 2).mean(dim=(1, 2, 3)).numpy()]
  psnr = np.mean(-10 * np.log10(np.mean(((images + 1) / 2 - rec01) ** 2, axis=(1, 2, 3))))
  for (loss, aux), rec_loss in zip(got, rec_losses):
    want = np.mean(rec_loss + 0.5 * kl / (3 * 64 * 64))
    assert kl.mean() * 0.5 / (3 * 64 * 64) > 1e-3 * want  # the KL term is in the comparison
    np.testing.assert_allclose(float(loss), want, rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(aux["rec_loss"]), rec_loss.mean(), rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(aux["kl"]), kl.mean(), rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(aux["psnr"]), psnr, rtol=LOSS_RTOL)


def _restore(run, workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  try:
    return ckpt.restore(trainer.abstract_state(run))  # (state, extra, step)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 4-step run (in-process; checkpoints and grids at 2 and 4) and its restored state."""
  a = tmp_path_factory.mktemp("vae") / "a"
  config = vae_config(sample_every_steps=2, **{"sample.num_reconstructions": 2})
  summary = trainer.train(config, a)
  run = trainer.setup(config, mesh=sharding.make_mesh(1, 1))
  return types.SimpleNamespace(a=a, config=config, summary=summary, run=run,
                               restored=_restore(run, a))


@pytest.mark.slow(reason="a second run compiles the step again (~12 s on 2 CPU cores)")
def test_resume_is_exact(runs, tmp_path):
  """A copy of the run without checkpoint 4, resumed from step 2 by the same call: params,
  optimizer state and data position at step 4 equal the uninterrupted run's bit for bit."""
  b = tmp_path / "b"
  shutil.copytree(runs.a, b)
  shutil.rmtree(b / "checkpoints" / "4")
  assert trainer.train(runs.config, b)["step"] == runs.summary["step"] == 4
  (sa, ea, step_a), (sb, eb, step_b) = runs.restored, _restore(runs.run, b)
  assert step_a == step_b == 4 and ea == eb
  for x, y in zip(jax.tree.leaves(jax.device_get(sa)), jax.tree.leaves(jax.device_get(sb))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_reconstruction_grid_and_held_out_psnr_rises(runs):
  """The grid pairs held-out originals with reconstructions (marked synthetic); two steps of
  training raise their PSNR."""
  png = runs.a / "samples" / "step_000004.png"
  assert runs.summary["samples"] == str(png)
  with Image.open(png) as image:
    assert image.info["synthetic"] == "true" and "reconstruction" in image.info["layout"]
    assert image.size == (4 * 64, 64)  # 2 pairs side by side
  at = {s: json.loads((runs.a / "samples" / f"step_{s:06d}.json").read_text()) for s in (2, 4)}
  assert at[4]["num_images"] == 2 and 0 < at[4]["ssim"] <= 1
  assert at[4]["psnr"] > at[2]["psnr"] + 0.3, at  # measured 14.07 -> 14.95 dB


def test_unet_and_text_encoder_untouched_in_the_export(runs, tmp_path):
  """What `python -m medjax.export --from=<workdir>` writes: the trained VAE, and the U-Net and
  text encoder bit-identical to the base model's."""
  state = runs.restored[0]
  trained = trainer.trained_pipeline(runs.run, state, ema=False)
  trained = dataclasses.replace(trained, params=jax.device_get(trained.params))
  trained.save_pretrained(tmp_path / "exported")
  exported = StableDiffusion.from_pretrained(tmp_path / "exported")
  base = StableDiffusion.embedded(0)
  for name in ("unet", "text_encoder"):
    for x, y in zip(jax.tree.leaves(exported.params[name]), jax.tree.leaves(base.params[name])):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(exported.params["vae"]), jax.tree.leaves(trained.params["vae"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
              zip(jax.tree.leaves(exported.params["vae"]), jax.tree.leaves(base.params["vae"])))
  assert moved > 0


def test_decoder_only_splits_off_the_encoder():
  sd, trainable = trainer.build_model(vae_config(**{"vae.train_encoder": False}))
  train, frozen = trainable.split(sd.params)
  assert sorted(train["vae"]) == ["decoder", "post_quant_conv"]
  assert sorted(frozen["vae"]) == ["encoder", "quant_conv"]
  assert sorted(frozen) == ["text_encoder", "unet", "vae"]
  merged = trainable.merge(train, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(sd.params)


@pytest.mark.parametrize("changes,message", [
    ({"vae.loss": "l3"}, "config.vae.loss='l3': expected 'l1' or 'l2'"),
    ({"vae.kl_weight": -1.0}, "config.vae.kl_weight=-1.0: expected a number >= 0"),
    ({"vae.train_encoder": False, "vae.train_decoder": False},
     "config.vae.train_encoder and config.vae.train_decoder are both False"),
    ({"sample.num_reconstructions": -1}, "config.sample.num_reconstructions=-1"),
    ({"cache_latents": True}, "config.objective='vae' trains the VAE on images"),
    ({"prior.enabled": True}, "config.objective='vae' trains the VAE on images"),
])
def test_bad_vae_config_values_are_one_line(changes, message):
  with pytest.raises(MedjaxError) as e:
    trainer.check_run_config(vae_config(**changes))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_workdir_of_another_vae_loss_is_refused(runs):
  """A VAE workdir resumed with another VAE loss is another config: refused in one line."""
  with pytest.raises(MedjaxError, match="differs in vae.loss"):
    trainer.check_workdir(vae_config(**{"vae.loss": "l2"}), runs.a)


@pytest.mark.slow(reason="compiles two steps (~20 s on 2 CPU cores)")
def test_grad_accumulation_matches_one_batch():
  """Two micro-batches of the VAE loss give the one-batch update (same noise, drawn first).
  A large Adam epsilon keeps the update proportional to the gradient (see test_train.py)."""
  kw = dict(batch_size=4, total_steps=1, adam_eps=1.0, learning_rate=1.0, max_grad_norm=0.0)
  _, one, l1 = run_steps(vae_config(**kw), 1)
  _, two, l2 = run_steps(vae_config(grad_accum=2, **kw), 1)
  assert abs(l1[0] - l2[0]) < 1e-6
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)))
  assert diff < 1e-6, diff
