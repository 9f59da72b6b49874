"""Training and inference of the evaluation classifiers (`medjax.eval.classifiers`).

Pure functions around a `ClassifierState` (params, BatchNorm statistics, Adam state):
`create_state`, a jitted `train_step`, `predict` and `train_classifier`, the loop the
evaluation protocol calls. Defaults (`default_config`) are paper A's downstream classifier:
ResNet-18, Adam lr 1e-4, batch 32, 6,250 steps, 196x196 input.

Data are NumPy arrays, `images` float [N, H, W, C] in [-1, 1] (what `medjax.data.make_dataset`
yields; C = 1 is repeated to the model's `in_channels`), or `medjax.eval.image_store` stores
(uint8 on disk, read batch by batch, so memory does not grow with N), resized on
the device to `image_size` with `jax.image.resize` (bilinear, antialiased), then normalised
('imagenet': mapped to [0, 1] and standardised with ImageNet's mean/std, as torchvision
weights expect; 'none': left in [-1, 1]). Labels by task:
  - 'binary': [N] in {0, 1}; one logit, sigmoid binary cross-entropy.
  - 'multilabel': [N, L] in {0, 1}, NaN or -1 for unknown (masked out of the loss and AUC).
  - 'multiclass': [N] integer classes; softmax cross-entropy.
"""
import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from tqdm.auto import tqdm

from medjax import hosts
from medjax import sharding
from medjax.errors import MedjaxError
from medjax.eval import auc as auc_lib
from medjax.eval import classifiers
from medjax.validation import check_known_keys

TASKS = ("binary", "multilabel", "multiclass")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config() -> ml_collections.ConfigDict:
  """The classifier training config; defaults are paper A's (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.model = "resnet18"          # a key of classifiers.CLASSIFIERS
  c.task = "binary"             # binary | multilabel | multiclass
  c.num_classes = 0             # 0: from the task/labels (binary 1, multilabel L, multiclass max+1)
  c.image_size = 196            # model input side; images are resized to it on the device
  c.in_channels = 3             # 1-channel images are repeated to this
  c.normalize = "imagenet"      # imagenet | none (see the module docstring)
  c.dtype = "float32"           # compute dtype; params stay fp32
  c.batch_size = 32
  c.num_steps = 6250
  c.learning_rate = 1e-4        # Adam, constant
  c.seed = 0                    # init, batch order and flips: same seed, same result
  c.augment_flip = False        # random horizontal flips
  c.eval_every = 0              # validate every N steps (0: at the end only)
  # best (by val AUC over the eval_every checks; needs eval_every > 0) | last
  c.select = "last"
  c.log_every = 50              # loss points in the history
  c.predict_batch_size = 64
  c.progress = True             # tqdm bar (steps/s)
  return c


def check_config(cfg: Any, where: str = "config.classifier") -> None:
  """Settings that would silently do something else: select='best' with eval_every=0 checks the
  val AUC only at the last step, so 'best' would keep the last step."""
  if cfg.select not in ("best", "last"):
    raise MedjaxError(f"{where}: select must be 'best' or 'last', got {cfg.select!r}")
  if cfg.select == "best" and not cfg.eval_every:
    raise MedjaxError(f"{where}: select='best' needs eval_every > 0 (with eval_every=0 val AUC "
                      "is checked at the last step only, so 'best' keeps the last step); set "
                      "eval_every=N or select='last'")


class ClassifierState(train_state.TrainState):
  """TrainState + BatchNorm statistics and the (static) input handling of the model."""
  batch_stats: Any = None
  task: str = struct.field(pytree_node=False, default="binary")
  image_size: int = struct.field(pytree_node=False, default=196)
  in_channels: int = struct.field(pytree_node=False, default=3)
  normalize: str = struct.field(pytree_node=False, default="imagenet")


def create_state(model: nn.Module, key: jax.Array, input_shape, optimizer:
                 optax.GradientTransformation, task: str = "binary",
                 normalize: str = "imagenet", variables: dict | None = None) -> ClassifierState:
  """Initialises `model` for inputs [.., H, W, C] = `input_shape` (H == W = model input size).

  The init is torchvision's, drawn from `key` (`classifiers.init_variables`); `variables`
  ({'params', 'batch_stats'}, e.g. from `medjax.eval.classifier_weights`) replaces it.
  """
  if task not in TASKS:
    raise MedjaxError(f"task must be one of {TASKS}, got {task!r}")
  if normalize not in ("imagenet", "none"):
    raise MedjaxError(f"normalize must be 'imagenet' or 'none', got {normalize!r}")
  h, w, c = tuple(input_shape)[-3:]
  if h != w or h < 32:
    raise MedjaxError(f"classifier input must be square and >= 32 pixels, got {h}x{w}")
  if normalize == "imagenet" and c != 3:
    raise MedjaxError(f"normalize='imagenet' needs 3 input channels, got {c}")
  if variables is None:
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
    variables = classifiers.init_variables(model, (h, w, c), seed)
  variables = nn.unbox(variables)
  return ClassifierState.create(
      apply_fn=model.apply, params=variables["params"], tx=optimizer,
      batch_stats=variables.get("batch_stats", {}), task=task, image_size=int(h),
      in_channels=int(c), normalize=normalize)


def preprocess(images: jax.Array, image_size: int, in_channels: int,
               normalize: str) -> jax.Array:
  """[B, H, W, C] in [-1, 1] -> the model input (channels, size, normalisation)."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1 and in_channels != 1:
    x = jnp.repeat(x, in_channels, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), "bilinear")
  if normalize == "imagenet":
    x = ((x + 1.0) / 2.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x


def _state_input(state: ClassifierState, images: jax.Array) -> jax.Array:
  return preprocess(images, state.image_size, state.in_channels, state.normalize)


def loss_fn(logits: jax.Array, batch: dict, task: str) -> jax.Array:
  """Mean loss of the task; multilabel averages over known (mask = 1) entries only."""
  if task == "binary":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0], batch["label"]))
  if task == "multilabel":
    mask = batch["mask"]
    losses = optax.sigmoid_binary_cross_entropy(logits, batch["label"]) * mask
    return jnp.sum(losses) / jnp.maximum(jnp.sum(mask), 1.0)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["label"].astype(jnp.int32)))


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: ClassifierState, batch: dict) -> tuple[ClassifierState, dict]:
  """One Adam step on `batch` ({'image', 'label'[, 'mask', 'flip']}): (state, {'loss'}).

  BatchNorm runs in training mode and its running statistics are updated. The input state is
  donated (do not reuse it).
  """
  x = _state_input(state, batch["image"])
  if "flip" in batch:
    x = jnp.where(batch["flip"][:, None, None, None], x[:, :, ::-1], x)

  def compute_loss(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
    return loss_fn(logits, batch, state.task), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss}


def _scores(logits: jax.Array, task: str) -> jax.Array:
  if task == "binary":
    return jax.nn.sigmoid(logits[:, 0])
  if task == "multilabel":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


@functools.lru_cache(maxsize=32)
def _predict_fn(apply_fn: Callable, task: str, image_size: int, in_channels: int,
                normalize: str, logits: bool):
  def fn(params, batch_stats, images):
    x = preprocess(images, image_size, in_channels, normalize)
    out = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)
    return out if logits else _scores(out, task)
  return jax.jit(fn)


def predict(state: ClassifierState, images, batch_size: int = 64, logits: bool = False,
            mesh=None) -> np.ndarray:
  """Scores for `images` ([N, H, W, C] in [-1, 1]), eval-mode BatchNorm.

  Binary: P(positive) [N]; multilabel: per-label sigmoid [N, L]; multiclass: softmax [N, K]
  (`logits=True`: raw logits). One compiled program per image shape: the last batch is padded.
  With `mesh`, batches are split over its data axes (batch_size must divide evenly; it is capped
  at N rounded up to the data-parallel size). The mesh may span several processes: then every
  process passes the same images and gets all N scores.
  """
  if not _is_store(images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise MedjaxError(f"predict: images must be [N, H, W, C], got shape {images.shape}")
  n = len(images)
  if n == 0:
    raise MedjaxError("predict: no images")
  if mesh is None:
    batch_size = min(batch_size, n)
  else:
    sharding.check_batch_size(batch_size, mesh, "predict batch_size")
    per = sharding.data_parallel_size(mesh)
    batch_size = min(batch_size, -(-n // per) * per)
  fn = _predict_fn(state.apply_fn, state.task, state.image_size, state.in_channels,
                   state.normalize, logits)
  params, batch_stats = state.params, state.batch_stats
  if mesh is not None:
    params, batch_stats = hosts.to_global((params, batch_stats), sharding.replicated(mesh))
  out = []
  for start in range(0, n, batch_size):
    batch = _rows(images, np.arange(start, min(start + batch_size, n)))
    count = batch.shape[0]
    if count < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:],
                                              batch.dtype)])
    if mesh is not None:
      batch = hosts.to_global(batch, sharding.batch_sharding(mesh))
    out.append(hosts.to_host(fn(params, batch_stats, batch))[:count])
  return np.concatenate(out)


def evaluate(state: ClassifierState, images, labels, batch_size: int = 64,
             mesh=None) -> dict[str, float]:
  """{'auc', 'accuracy'}: AUC binary / macro over labels (multilabel, multiclass one-vs-rest)."""
  scores = predict(state, images, batch_size, mesh=mesh)
  labels = np.asarray(labels)
  if state.task == "binary":
    return {"auc": auc_lib.roc_auc(labels, scores), "accuracy": auc_lib.accuracy(labels, scores)}
  if state.task == "multilabel":
    return {"auc": auc_lib.multilabel_auc(labels, scores)["macro"],
            "accuracy": float(np.mean(((scores >= 0.5) == (labels == 1))[_known(labels)]))}
  onehot = np.eye(scores.shape[1])[labels.astype(int)]
  return {"auc": auc_lib.multilabel_auc(onehot, scores)["macro"],
          "accuracy": float(np.mean(scores.argmax(-1) == labels))}


def _known(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels, np.float64)
  return np.isfinite(labels) & (labels >= 0)


def _is_store(images) -> bool:
  """An `image_store.ImageStore` (or anything with its `floats(indices)` and `shape`)."""
  return hasattr(images, "floats") and hasattr(images, "shape") and not hasattr(images, "dtype")


def _rows(images, idx) -> np.ndarray:
  """float32 rows `idx` of an array or a store (read from disk)."""
  if _is_store(images):
    return images.floats(idx)
  return np.asarray(images[idx], np.float32)


def _check_data(data, task: str, name: str) -> tuple[Any, np.ndarray]:
  if isinstance(data, dict):
    data = (data.get("image"), data.get("label", data.get("labels")))
  elif _is_store(data):
    data = (data, data.labels)
  try:
    images, labels = data
  except (TypeError, ValueError) as e:
    raise MedjaxError(f"{name}: expected (images, labels), a store or {{'image', 'label'}}") from e
  labels = np.asarray(labels)
  if _is_store(images):  # uint8 on disk: always within [-1, 1] once read
    if len(images.shape) != 3:
      raise MedjaxError(f"{name}: store images must be [H, W, C], got {images.shape}")
  else:
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype.kind != "f":
      raise MedjaxError(f"{name}: images must be float [N, H, W, C] in [-1, 1], got "
                        f"{images.dtype} {images.shape}")
  if len(images) != labels.shape[0]:
    raise MedjaxError(f"{name}: {len(images)} images but {labels.shape[0]} labels")
  if not _is_store(images):
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
      raise MedjaxError(f"{name}: images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
  want_ndim = 2 if task == "multilabel" else 1
  if labels.ndim != want_ndim:
    raise MedjaxError(f"{name}: task {task!r} needs labels of {want_ndim} dims, got {labels.shape}")
  known = _known(labels)
  if task in ("binary", "multilabel") and not np.all(np.isin(labels[known], (0, 1))):
    raise MedjaxError(f"{name}: {task} labels must be 0/1 (NaN or -1 unknown for multilabel)")
  if task == "binary" and not np.all(known):
    raise MedjaxError(f"{name}: binary labels must all be known 0/1")
  if task == "multiclass" and (not np.all(known) or np.any(labels != np.round(labels))):
    raise MedjaxError(f"{name}: multiclass labels must be integers >= 0")
  return images, labels


def _make_batch(images, labels, idx, task, flip) -> dict:
  batch = {"image": _rows(images, idx)}
  y = labels[idx]
  if task == "multilabel":
    mask = _known(y)
    batch["label"] = np.where(mask, y, 0).astype(np.float32)
    batch["mask"] = mask.astype(np.float32)
  elif task == "binary":
    batch["label"] = y.astype(np.float32)
  else:
    batch["label"] = y.astype(np.int32)
  if flip is not None:
    batch["flip"] = flip
  return batch


def _batch_indices(n: int, batch_size: int, rng: np.random.Generator):
  """Endless batches over epochs of shuffled indices (an epoch's tail continues the next)."""
  pending = np.zeros((0,), np.int64)
  while True:
    while pending.size < batch_size:
      pending = np.concatenate([pending, rng.permutation(n)])
    yield pending[:batch_size]
    pending = pending[batch_size:]


# One model / optimizer object per setting, so that repeated runs (seeds, repeats) reuse the
# compiled train step: jit keys on the state's static apply_fn and tx, compared by identity.
@functools.lru_cache(maxsize=16)
def _model(name: str, num_classes: int, dtype) -> nn.Module:
  return classifiers.make_classifier(name, num_classes, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
  return optax.adam(learning_rate)


def train_classifier(config, train_data, val_data=None, mesh=None,
                     variables: dict | None = None) -> tuple[ClassifierState, dict]:
  """Trains a classifier; returns (state, history).

  Args:
    config: `default_config()` or a dict/ConfigDict overriding some of its fields.
    train_data, val_data: (images, labels), {'image', 'label'} or an `image_store.ImageStore`
      (its own labels), or (store, labels) (see the module docstring).
    mesh: a `jax.sharding.Mesh` (e.g. `medjax.sharding.make_mesh()`): batches are split over its
      data axes, params replicated. None: default device. A mesh over several processes needs
      the same call (same data and config) on every process; each feeds its devices' rows of
      the batches, which every process draws alike.
    variables: initial {'params', 'batch_stats'} (e.g. ImageNet via
      `medjax.eval.classifier_weights`).

  With val data and `select='best'`, the state with the best validation AUC (checked every
  `eval_every` steps and at the end) is returned (its params and BatchNorm statistics; the
  optimizer state is the last step's). `history`: {'step', 'loss' (mean over each
  `log_every` steps), 'val_step', 'val_auc', 'val_accuracy', 'best_step', 'best_val_auc',
  'steps_per_s', 'num_classes'}.
  """
  cfg = default_config()
  if isinstance(config, ml_collections.ConfigDict):
    overrides = config.to_dict()
  else:
    overrides = dict(config or {})
  check_known_keys(overrides, cfg, "train_classifier config")
  cfg.update(overrides)
  if cfg.task not in TASKS:
    raise MedjaxError(f"train_classifier: task must be one of {TASKS}, got {cfg.task!r}")
  check_config(cfg, "train_classifier config")
  images, labels = _check_data(train_data, cfg.task, "train_data")
  val = _check_data(val_data, cfg.task, "val_data") if val_data is not None else None
  if cfg.batch_size < 1 or cfg.num_steps < 1:
    raise MedjaxError("train_classifier: batch_size and num_steps must be >= 1")
  if mesh is not None:
    sharding.check_batch_size(cfg.batch_size, mesh)
  num_classes = cfg.num_classes
  if not num_classes:
    num_classes = {"binary": lambda: 1, "multilabel": lambda: labels.shape[-1],
                   "multiclass": lambda: int(labels.max()) + 1}[cfg.task]()
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.dtype)
  if dtype is None:
    raise MedjaxError(f"train_classifier: dtype must be float32 or bfloat16, got {cfg.dtype!r}")

  model = _model(cfg.model, num_classes, dtype)
  state = create_state(model, jax.random.PRNGKey(cfg.seed),
                       (cfg.image_size, cfg.image_size, cfg.in_channels),
                       _adam(float(cfg.learning_rate)), task=cfg.task, normalize=cfg.normalize,
                       variables=variables)
  if mesh is not None:
    state = hosts.to_global(state, sharding.replicated(mesh))
  rng = np.random.default_rng(cfg.seed)
  batches = _batch_indices(len(images), cfg.batch_size, rng)
  history = {"step": [], "loss": [], "val_step": [], "val_auc": [], "val_accuracy": [],
             "best_step": None, "best_val_auc": None, "num_classes": num_classes}
  best = None

  def validate(step):
    nonlocal best
    metrics = evaluate(state, *val, batch_size=cfg.predict_batch_size, mesh=mesh)
    history["val_step"].append(step)
    history["val_auc"].append(metrics["auc"])
    history["val_accuracy"].append(metrics["accuracy"])
    if history["best_val_auc"] is None or metrics["auc"] > history["best_val_auc"]:
      history["best_val_auc"], history["best_step"] = metrics["auc"], step
      best = hosts.to_host((state.params, state.batch_stats))
    return metrics

  bar = tqdm(total=cfg.num_steps, unit="step", desc=cfg.model,
             disable=not (cfg.progress and hosts.is_lead()))  # one bar for N processes
  losses, start = [], None
  for step in range(1, cfg.num_steps + 1):
    idx = next(batches)
    flip = rng.random(cfg.batch_size) < 0.5 if cfg.augment_flip else None
    batch = _make_batch(images, labels, idx, cfg.task, flip)
    if mesh is not None:  # every process has the whole batch: it keeps its devices' rows
      batch = hosts.to_global(batch, sharding.batch_sharding(mesh))
    state, metrics = train_step(state, batch)
    losses.append(metrics["loss"])
    if step == 1:
      jax.block_until_ready(metrics["loss"])
      start = time.perf_counter()  # steps/s excludes the compile
    if step % cfg.log_every == 0 or step == cfg.num_steps:
      history["step"].append(step)
      history["loss"].append(float(np.mean(jax.device_get(losses))))
      losses = []
      bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
    if val is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.num_steps:
      bar.set_postfix(val_auc=f"{validate(step)['auc']:.4f}")
    bar.update(1)
  jax.block_until_ready(state.params)
  elapsed = time.perf_counter() - start
  history["steps_per_s"] = (cfg.num_steps - 1) / elapsed if cfg.num_steps > 1 and elapsed else None
  if val is not None:
    validate(cfg.num_steps)
    if cfg.select == "best" and history["best_step"] != cfg.num_steps:
      params, batch_stats = best
      if mesh is not None:
        params, batch_stats = hosts.to_global((params, batch_stats),
                                                    sharding.replicated(mesh))
      state = state.replace(params=params, batch_stats=batch_stats)
  bar.close()
  return state, history
