"""Training pieces in-process on one device: frozen rows, grad accumulation, loss weights (vs
diffusers' training utilities), EMA (vs diffusers' EMAModel), bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import batches
from medjax import objectives
from medjax import sharding
from medjax import tokenizer as tokenizer_lib
from medjax import train_config
from medjax import trainer
from medjax.errors import MedjaxError
from medjax.models import clip
from tests.train_support import run_steps
from tests.train_support import tiny_config


@pytest.fixture(scope="module")
def ti_run():
  """Two textual-inversion steps (EMA on), shared by the tests below: one compile."""
  return run_steps(tiny_config("textual_inversion", ema_decay=0.9), 2)


def test_textual_inversion_changes_only_new_rows(ti_run):
  run, state, losses = ti_run
  assert all(np.isfinite(losses))
  before = run.sd.params
  after = trainer.trained_pipeline(run, state).params
  ids = np.asarray(run.trainable.token_ids)
  assert len(ids) == 8  # two tokens x 4 vectors
  t0 = np.asarray(clip.token_embedding_table(before["text_encoder"]))
  t1 = np.asarray(clip.token_embedding_table(after["text_encoder"]))
  others = np.setdiff1d(np.arange(t0.shape[0]), ids)
  np.testing.assert_array_equal(t1[others], t0[others])  # bit-identical
  assert np.all(np.abs(t1[ids] - t0[ids]).max(axis=1) > 0)  # every new row moved
  for name in ("unet", "vae"):
    for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # All other text-encoder params are untouched too.
  flat0 = jax.tree_util.tree_leaves_with_path(before["text_encoder"])
  flat1 = dict(jax.tree_util.tree_leaves_with_path(after["text_encoder"]))
  for path, leaf in flat0:
    if "token_embedding" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat1[path]))


def test_placeholder_embeddings_equal_the_merged_table(ti_run):
  run, state, _ = ti_run
  ids = jnp.asarray(run.sd.tokenize(["a chest x-ray with <effusion>", "<healthy-cxr> lung"]))
  params, embeds = run.trainable.text_inputs(state.params, run.frozen, ids)
  merged = run.trainable.merge(state.params, run.frozen)
  table = np.asarray(clip.token_embedding_table(merged["text_encoder"]))
  np.testing.assert_array_equal(np.asarray(embeds), table[np.asarray(ids)])
  te = run.sd.text_encoder
  via_ids = te.apply({"params": merged["text_encoder"]}, ids)
  via_embeds = te.apply({"params": params["text_encoder"]}, ids, embeds)
  for a, b in zip(via_ids, via_embeds):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_initial_vectors_copy_initializer_words(ti_run):
  run = ti_run[0]
  tok = tokenizer_lib.base_tokenizer(run.sd.tokenizer)
  ids = tok("pleural effusion", add_special_tokens=False)["input_ids"]
  table = np.asarray(clip.token_embedding_table(run.sd.params["text_encoder"]))
  rows = table[np.asarray(run.trainable.token_ids[:4])]
  np.testing.assert_array_equal(rows, table[[ids[i % len(ids)] for i in range(4)]])


@pytest.mark.slow  # two compiles of the U-Net step (~1 min on 2 cores)
def test_grad_accumulation_matches_one_batch():
  # A large Adam epsilon makes the update proportional to the gradient (Adam's first step is
  # otherwise ~lr * sign(g), which amplifies round-off in near-zero gradients).
  kw = dict(batch_size=4, total_steps=1, adam_eps=1.0, learning_rate=1.0, max_grad_norm=0.0)
  _, s1, l1 = run_steps(tiny_config(**kw), 1)
  _, s2, l2 = run_steps(tiny_config(grad_accum=2, **kw), 1)
  assert abs(l1[0] - l2[0]) < 1e-6
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)))
  assert diff < 1e-6, diff


def test_prior_weights_give_instance_plus_weighted_prior():
  lc = objectives.LossConfig(prior_loss_weight=0.5)
  batch = {"moments": jnp.zeros((6, 2, 2, 8)), "prior": jnp.array([0, 0, 0, 0, 1, 1.0])}
  w = np.asarray(objectives.example_weights(batch, lc))
  np.testing.assert_allclose(w, [0.25] * 4 + [0.25] * 2)
  per_example = np.arange(1.0, 7.0)
  expected = per_example[:4].mean() + 0.5 * per_example[4:].mean()
  assert abs(float((w * per_example).sum()) - expected) < 1e-12


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  from diffusers.training_utils import compute_snr  # pylint: disable=g-import-not-at-top
  sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type)
  t = np.array([0, 10, 250, 999])
  snr = compute_snr(sched, torch.tensor(t)).numpy()
  gamma = 5.0
  # diffusers' train_text_to_image.py min-SNR weights:
  mse_w = np.minimum(snr, gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
  lc = objectives.LossConfig(prediction_type=prediction_type, min_snr_gamma=gamma)
  acp = jnp.asarray(sched.alphas_cumprod.numpy())
  # Feed a batch whose per-example error is exactly 1 (U-Net and text encoder stubbed).
  class Stub:
    def __init__(self, out):
      self.out = out

    def apply(self, variables, *args):
      return self.out(*args[:3]) if len(args) == 3 else self.out(args[0])
  b = len(t)
  batch = {"moments": jnp.zeros((b, 1, 1, 2)), "latent_noise": jnp.zeros((b, 1, 1, 1)),
           "noise": jnp.zeros((b, 1, 1, 1)), "t": jnp.asarray(t), "input_ids": jnp.zeros((b, 1)),
           "weight": jnp.eye(b)[0]}
  unet = Stub(lambda x, tt, c: jnp.ones_like(x))
  text = Stub(lambda ids: (jnp.zeros((b, 1, 1)),))
  for i in range(b):
    batch["weight"] = jnp.eye(b)[i]
    loss, _ = objectives.diffusion_loss(unet, text, acp, lc, {"unet": {}, "text_encoder": {}},
                                        batch)
    np.testing.assert_allclose(float(loss), mse_w[i], rtol=1e-5)


def test_ema_matches_diffusers_ema_model():
  torch = pytest.importorskip("torch")
  from diffusers.training_utils import EMAModel  # pylint: disable=g-import-not-at-top
  values = [np.float32(v) for v in (1.0, 3.0, -2.0, 5.0, 0.5)]
  p = torch.nn.Parameter(torch.tensor([values[0]]))
  ema = EMAModel([p], decay=0.9)
  e = jnp.asarray([values[0]])
  for step, v in enumerate(values[1:]):
    with torch.no_grad():
      p.copy_(torch.tensor([v]))
    ema.step([p])
    s = jnp.float32(step)
    d = jnp.where(s <= 0, 0.0, jnp.minimum(0.9, (1.0 + s) / (10.0 + s)))
    e = d * e + (1 - d) * jnp.asarray([v])
    np.testing.assert_allclose(np.asarray(e), ema.shadow_params[0].numpy(), rtol=1e-6)


def test_ema_in_train_step(ti_run):
  run, state, _ = ti_run
  # Update 1 has decay 0 (EMA = params p1); update 2 has decay 2/11: ema = 2/11 p1 + 9/11 p2.
  ema, p2 = np.asarray(state.ema_params["embeddings"]), np.asarray(state.params["embeddings"])
  assert not np.array_equal(ema, p2)
  init = np.asarray(clip.token_embedding_table(run.sd.params["text_encoder"]))[
      np.asarray(run.trainable.token_ids)]
  assert np.abs(ema - p2).max() < np.abs(init - p2).max()


def test_fsdp_rules_shard_and_fall_back():
  mesh = sharding.make_mesh(1, 1)
  spec = sharding.spec_for(("embed", "mlp"), (32, 64), mesh, sharding.DEFAULT_RULES)
  assert spec == jax.sharding.PartitionSpec(None, None)  # fsdp axis of size 1: replicated


def test_bad_inputs():
  with pytest.raises(MedjaxError, match="unknown key 'learning_rat'"):
    train_config.check_train_config(_with_extra_key())
  with pytest.raises(MedjaxError, match="only 1 are available"):
    sharding.make_mesh(16, 1)
  with pytest.raises(MedjaxError, match="not divisible"):
    trainer.setup(tiny_config(batch_size=3), mesh=_fake_two_device_mesh())
  sd, _ = trainer.build_model(tiny_config())
  in_vocab = next(k for k in sd.tokenizer.get_vocab() if k.isalpha() and len(k) > 3)
  with pytest.raises(MedjaxError, match="already in the tokenizer vocabulary"):
    trainer.build_model(tiny_config("textual_inversion",
                                  **{"textual_inversion.tokens": ((in_vocab, "chest"),)}))
  with pytest.raises(MedjaxError, match="given twice"):
    trainer.parse_tokens((("<a>", "chest"), ("<a>", "lung")))
  with pytest.raises(MedjaxError, match=r"is not a \('<token>', 'init words'\) pair"):
    trainer.parse_tokens((("<x>",),))
  with pytest.raises(MedjaxError, match="is empty"):
    trainer.parse_tokens(())
  with pytest.raises(MedjaxError, match="mixed_precision"):
    trainer.build_model(tiny_config(mixed_precision="fp8"))
  with pytest.raises(MedjaxError, match=r"config.attention='flash': expected one of auto, xla"):
    train_config.check_train_config(tiny_config(attention="flash"))


def _with_extra_key():
  c = tiny_config()
  c.unlock()
  c.learning_rat = 1.0
  return c


def _fake_two_device_mesh():
  class Mesh:
    shape = {"data": 2, "fsdp": 1}
  return Mesh()


def test_workdir_with_another_config_is_refused(tmp_path):
  config = tiny_config()
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  other = tiny_config(learning_rate=0.5)
  (tmp_path / "config.json").write_text(other.to_json())
  with pytest.raises(MedjaxError, match="differs in learning_rate"):
    trainer.check_workdir(config, tmp_path)
  config.allow_config_change = True
  trainer.check_workdir(config, tmp_path)
  # Changing only resumable keys (a longer run) is fine.
  (tmp_path / "config.json").write_text(tiny_config(total_steps=100).to_json())
  trainer.check_workdir(tiny_config(), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 100


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(learning_rate=1e30, total_steps=6, max_grad_norm=0.0)
  with pytest.raises(MedjaxError, match="non-finite loss .* Last good checkpoint: step"):
    trainer.train(config, tmp_path)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) < 6


def test_nan_learning_rate_never_saves_non_finite_params(tmp_path):
  """lr=nan: step 1's loss is finite but its params are not; checkpoint 1 must not be written."""
  config = tiny_config(learning_rate=float("nan"), total_steps=3, checkpoint_every_steps=1,
                       log_every_steps=3)
  with pytest.raises(MedjaxError, match=r"^non-finite loss or params in step 1; .* Last good "
                     r"checkpoint: none \(no checkpoint in .*\)\. Lower") as e:
    trainer.train(config, tmp_path)
  assert "\n" not in str(e.value)
  # no checkpoint, and a fresh run that saved none removes what it created (issue 15)
  assert not list(tmp_path.iterdir())


def _guard_value_access(monkeypatch):
  """On CPU, jax's device-to-host transfer guard never fires (XLA:CPU arrays convert to NumPy
  without a copy; jax-ml/jax#16602): make implicit conversions raise wherever the guard is
  'disallow', as on GPU/TPU. Explicit `jax.device_get` stays allowed, as there."""
  from jax._src import array as array_impl  # pylint: disable=import-outside-toplevel
  from jax._src import config as jax_config  # pylint: disable=import-outside-toplevel
  value = array_impl.ArrayImpl._value  # pylint: disable=protected-access

  def guarded(self):
    if (jax_config.transfer_guard_device_to_host.value == "disallow"
        and not jax_config.guard_lib.thread_local_state().explicit_device_get):
      raise RuntimeError("Disallowed device-to-host transfer")
    return value.fget(self)
  monkeypatch.setattr(array_impl.ArrayImpl, "_value", property(guarded))


def test_loop_makes_no_host_transfer_between_log_steps(tmp_path, monkeypatch):
  _guard_value_access(monkeypatch)
  config = tiny_config(total_steps=3, log_every_steps=3, checkpoint_every_steps=3,
                       cache_latents=True)
  summary = trainer.train(config, tmp_path / "ok")
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  assert summary["checkpoints"] == [3]
  # The guard does hold in the loop: a step body reading a device value fails.
  take = batches.Prefetcher.next

  def reading_next(self):
    batch = take(self)
    float(batch["input_ids"][0, 0])
    return batch
  monkeypatch.setattr(batches.Prefetcher, "next", reading_next)
  with pytest.raises(RuntimeError, match="Disallowed device-to-host transfer"):
    trainer.train(config, tmp_path / "reads")


def test_data_state_per_process_and_old_checkpoints():
  state = {"parent": {"i": 3}, "read_skips": 0}
  assert trainer.data_state_for({"data": state}, (0, 1), "w/3") == state  # older format
  assert trainer.data_state_for({"data": [{"a": 0}, {"a": 1}]}, (1, 2), "w/3") == {"a": 1}
  with pytest.raises(MedjaxError, match="w/3: this checkpoint holds the data positions of 2 "
                     r"process\(es\) but this run has 4; resume with 2"):
    trainer.data_state_for({"data": [{}, {}]}, (0, 4), "w/3")
  with pytest.raises(MedjaxError, match="of 1 process"):
    trainer.data_state_for({"data": state}, (0, 2), "w/3")


def test_prior_preservation_with_generated_class_images_and_cached_latents(tmp_path):
  config = tiny_config(total_steps=2, cache_latents=True,
                       **{"prior.enabled": True, "prior.num_class_images": 2,
                          "prior.num_inference_steps": 2, "prior.weight": 0.5,
                          "protocol": "paper_b"})  # paper B's U-Net: settings' provenance
  summary = trainer.train(config, tmp_path)
  assert summary["step"] == 2 and np.isfinite(summary["loss"])
  settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
  assert [(r["setting"], r["value"], r["source"], r["paper_value"]) for r in settings] == [
      ("base model", "embedded tiny SD, trained on phantoms", "ours", "SD 1.4"),
      ("resolution", 64, "ours", "512"), ("steps", 2, "ours", "not stated"),
      ("learning rate", 1e-4, "ours", "not stated"),
      ("images per class", "all", "ours", "1,000s of images in all")]
  class_images = sorted((tmp_path / "class_images").glob("*.png"))
  assert len(class_images) == 2
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(class_images[0]).text["synthetic"] == "true"
  rows = [json.loads(line) for line in (tmp_path / "tensorboard" / "metrics.jsonl").open()]
  last = rows[-1]
  assert last["prior_loss"] > 0 and last["instance_loss"] > 0
  np.testing.assert_allclose(last["loss"], last["instance_loss"] + 0.5 * last["prior_loss"],
                             rtol=1e-5)
  assert last["images_per_s"] >= 0


@pytest.mark.parametrize("name,arg", [
    ("cxr_unet", ""), ("cxr_unet", "paper,prior,text_encoder"), ("cxr_unet", "mimic"),
    ("cxr_ti", ""), ("cxr_ti", "paper,vectors=8"), ("mri_ti", ""), ("mri_ti", "paper"),
    ("mri_unet", ""), ("mri_unet", "paper,prior")])
def test_configs_load_and_validate(name, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  train_config.check_train_config(config)
  if "paper" in arg:
    assert config.resolution == 512
  if name.endswith("_ti"):
    assert config.objective == "textual_inversion" and config.weight_decay == 0
    assert config.textual_inversion.num_vectors == (8 if "vectors=8" in arg else 64)
