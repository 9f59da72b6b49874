"""Classifiers vs torchvision (random weights, random BN statistics, eval mode) and training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import torchvision

from medjax import sharding
from medjax.convert.weights import write_safetensors
from medjax.errors import MedjaxError
from medjax.eval import classifier_train as ct
from medjax.eval import classifier_weights
from medjax.eval import classifiers

torch.set_num_threads(1)
LOGITS_ATOL = 1e-4


def _random_torchvision(name: str, num_classes: int, seed: int) -> torch.nn.Module:
  """torchvision's init, random BN affine params and running stats, eval mode.

  Running stats are first measured on random inputs (so activations stay O(1) through 50+
  layers, as with trained weights), then perturbed: mean + N(0, 0.1), var * U(0.75, 1.25).
  """
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)(num_classes=num_classes)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if p.ndim == 1:  # BN scale/bias and head bias
        one = pname.endswith("weight") and not pname.startswith(classifier_weights.HEAD_NAMES)
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + float(one))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.momentum = None  # cumulative average over the calibration batch
    model.train()(torch.randn(8, 3, 64, 64, generator=gen))
    for bname, b in model.named_buffers():
      if bname.endswith("running_mean"):
        b.add_(torch.randn(b.shape, generator=gen) * 0.1)
      elif bname.endswith("running_var"):
        b.mul_(torch.rand(b.shape, generator=gen) * 0.5 + 0.75)
  return model.eval()


def _parity(name, tmp_path, size=64):
  tmodel = _random_torchvision(name, num_classes=5, seed=0)
  path = tmp_path / f"{name}.safetensors"
  write_safetensors({k: v.numpy() for k, v in tmodel.state_dict().items()}, path)
  model = classifiers.make_classifier(name, 5)
  variables = classifier_weights.load_torchvision(path, model, (1, size, size, 3))
  x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref32 = tmodel(xt).numpy()
    ref64 = tmodel.double()(xt.double()).numpy()
  err32, err64 = np.abs(got - ref32).max(), np.abs(got - ref64).max()
  torch_err = np.abs(ref32 - ref64).max()
  print(f"{name}: |logits| max {np.abs(ref64).max():.3g}; max abs err vs torch fp32 {err32:.3g}, "
        f"vs torch fp64 {err64:.3g} (torch fp32 vs fp64 {torch_err:.3g})")
  assert err32 <= LOGITS_ATOL
  # Against the exact (fp64) forward, no worse than twice torch's own fp32 rounding: on
  # ResNet-50 both fp32 forwards are ~1e-4 from it (50 layers, logits ~6).
  assert err64 <= max(LOGITS_ATOL, 2 * torch_err)


def test_resnet18_matches_torchvision(tmp_path):
  _parity("resnet18", tmp_path)


def test_resnet50_matches_torchvision(tmp_path):
  _parity("resnet50", tmp_path)


@pytest.mark.slow  # ~20 s on 2 CPU cores, mostly XLA compile
def test_densenet121_matches_torchvision(tmp_path):
  _parity("densenet121", tmp_path)


def test_converter_errors_and_head_skip(tmp_path):
  tmodel = torchvision.models.resnet18(num_classes=1000)
  sd = tmodel.state_dict()
  model = classifiers.make_classifier("resnet18", 2)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  with pytest.raises(MedjaxError,
                     match=r"wrong shape 2 \(fc.bias: got \(1000,\) for Flax \(2,\), fc.weight"):
    classifier_weights.state_dict_to_variables(sd, shapes)
  broken = {k: v for k, v in sd.items() if k != "layer1.0.bn1.running_var"}
  broken["extra.weight"] = torch.zeros(3)
  with pytest.raises(MedjaxError, match=r"missing 1 \(layer1.0.bn1.running_var\); unexpected 1"):
    classifier_weights.state_dict_to_variables(broken, shapes, skip_head=True)
  init = classifiers.init_variables(model, (32, 32, 3))
  # ImageNet body, new head
  got = classifier_weights.state_dict_to_variables(sd, init, skip_head=True)
  np.testing.assert_array_equal(got["params"]["fc"]["kernel"], init["params"]["fc"]["kernel"])
  np.testing.assert_array_equal(got["params"]["conv1"]["kernel"],
                                sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
  pth = tmp_path / "resnet18.pth"
  torch.save(sd, pth)
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    classifier_weights.load_torchvision(pth, model)
  assert classifier_weights.read_torchvision_weights(pth, allow_pickle=True).keys() == sd.keys()


def test_make_classifier_and_logical_axes():
  model = classifiers.make_classifier("resnet18", 3)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 1)))
  specs = nn_partition_specs(shapes["params"])
  assert specs["conv1"]["kernel"] == ("conv_height", "conv_width", "conv_in", "conv_out")
  assert specs["fc"]["kernel"] == ("embed", "mlp")
  assert set(shapes["batch_stats"]["bn1"]) == {"mean", "var"}
  with pytest.raises(MedjaxError, match="unknown classifier"):
    classifiers.make_classifier("vgg", 2)


def nn_partition_specs(tree):
  return jax.tree.map(lambda p: tuple(p.names), tree,
                      is_leaf=lambda p: isinstance(p, nn.Partitioned))


def test_loss_functions():
  logits = jnp.asarray([[0.3, -1.0], [2.0, 0.5]])
  ml = ct.loss_fn(logits, {"label": jnp.asarray([[1.0, 0.0], [0.0, 1.0]]),
                           "mask": jnp.asarray([[1.0, 0.0], [1.0, 1.0]])}, "multilabel")
  bce = lambda z, y: np.log1p(np.exp(-z)) if y else np.log1p(np.exp(z))
  assert float(ml) == pytest.approx((bce(0.3, 1) + bce(2.0, 0) + bce(0.5, 1)) / 3, rel=1e-6)
  mc = ct.loss_fn(logits, {"label": jnp.asarray([1, 0])}, "multiclass")
  ref = np.mean([-jax.nn.log_softmax(logits[0])[1], -jax.nn.log_softmax(logits[1])[0]])
  assert float(mc) == pytest.approx(float(ref), rel=1e-6)


def _squares(n, seed):
  """Bright vs dark 10x10 squares at random places on a noisy dark background, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  images = (-0.8 + rng.normal(0, 0.1, (n, 32, 32, 1))).astype(np.float32)
  for i in range(n):
    r, c = rng.integers(2, 20, 2)
    images[i, r:r + 10, c:c + 10] = 0.6 if labels[i] else -0.3
  return np.clip(images, -1, 1), labels


TINY = {"image_size": 32, "batch_size": 16, "learning_rate": 1e-3, "augment_flip": True,
        "log_every": 4, "progress": False}


@pytest.fixture(scope="module")
def trained():
  train, val = _squares(64, 0), _squares(64, 1)
  state, history = ct.train_classifier(dict(TINY, num_steps=8), train, val)
  return state, history, val


def test_training_learns_separable_task(trained):
  state, history, val = trained
  untrained = ct.create_state(ct._model("resnet18", 1, jnp.float32), jax.random.PRNGKey(0),
                              (32, 32, 3), optax.adam(1e-3))
  before = ct.evaluate(untrained, *val)["auc"]
  print(f"val AUC before {before:.3f}, after {history['val_auc'][-1]:.3f}; history {history}")
  assert before < 0.9  # the task is not solved by the random init
  assert history["best_val_auc"] > 0.9 and history["val_auc"][-1] > 0.9
  assert history["loss"][-1] < history["loss"][0]
  # predict pads the last batch: the same scores for any batch size.
  np.testing.assert_allclose(ct.predict(state, val[0][:7], batch_size=4),
                             ct.predict(state, val[0])[:7], atol=1e-5)


def test_training_is_deterministic(trained):
  del trained  # compiled train step shared with the fixture's run
  train = _squares(32, 2)
  a, _ = ct.train_classifier(dict(TINY, num_steps=2, seed=5), train)
  b, _ = ct.train_classifier(dict(TINY, num_steps=2, seed=5), train)
  c, _ = ct.train_classifier(dict(TINY, num_steps=2, seed=6), train)
  same = lambda x, y: all(jax.tree.leaves(jax.tree.map(np.array_equal, x, y)))
  assert same(a.params, b.params) and same(a.batch_stats, b.batch_stats)
  assert not same(a.params, c.params)
  # BatchNorm statistics moved away from their init (mean 0, var 1).
  assert np.abs(np.asarray(a.batch_stats["bn1"]["mean"])).max() > 0


def test_bad_training_input():
  images, labels = _squares(8, 0)
  with pytest.raises(MedjaxError, match=r"in \[-1, 1\]"):
    ct.train_classifier(TINY, (images * 3, labels))
  with pytest.raises(MedjaxError, match="8 images but 7 labels"):
    ct.train_classifier(TINY, (images, labels[:7]))
  with pytest.raises(MedjaxError, match="train_classifier config: unknown key 'lr'"):
    ct.train_classifier(dict(TINY, lr=1), (images, labels))
  with pytest.raises(MedjaxError, match="0/1"):
    ct.train_classifier(TINY, (images, labels + 1))
  with pytest.raises(MedjaxError, match=r"train_classifier config: select='best' needs "
                     r"eval_every > 0 \(with eval_every=0"):
    ct.train_classifier(dict(TINY, select="best"), (images, labels))
  ct.check_config(ml_collections.ConfigDict(dict(ct.default_config(), select="best",
                                                 eval_every=5)))  # fine with eval_every


@pytest.mark.slow
@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_other_tasks_train_and_evaluate(task):
  images, labels = _squares(32, 3)
  if task == "multilabel":  # [N, 2]: bright square, and its complement; some unknown (NaN)
    labels = np.stack([labels, 1 - labels], 1).astype(np.float32)
    labels[::5, 1] = np.nan
  state, history = ct.train_classifier(dict(TINY, task=task, num_steps=6, eval_every=3),
                                       (images, labels), (images, labels))
  assert history["num_classes"] == 2 and len(history["val_auc"]) == 2
  scores = ct.predict(state, images)
  assert scores.shape == (32, 2) and np.all((scores >= 0) & (scores <= 1))
  if task == "multiclass":
    np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-5)
  assert history["best_val_auc"] == max(history["val_auc"])


@pytest.mark.slow
def test_training_on_a_mesh_matches_single_device():
  mesh = sharding.make_mesh(data=-1)
  train = _squares(32, 2)
  a, _ = ct.train_classifier(dict(TINY, num_steps=2), train)
  b, _ = ct.train_classifier(dict(TINY, num_steps=2), train, mesh=mesh)
  close = jax.tree.map(lambda x, y: np.allclose(x, y, atol=1e-5), a.params, b.params)
  assert all(jax.tree.leaves(close))
  np.testing.assert_allclose(ct.predict(b, train[0], batch_size=8, mesh=mesh),
                             ct.predict(a, train[0], batch_size=8), atol=1e-5)
