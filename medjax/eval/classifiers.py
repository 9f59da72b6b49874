"""Image classifiers for the downstream evaluation: ResNet-18/50 and DenseNet-121 (Flax Linen).

NHWC; the architectures are torchvision's (ResNet v1.5: stride in the 3x3 conv of bottlenecks;
DenseNet-BC with growth 32) so `medjax.eval.classifier_weights` maps ImageNet weights 1:1.
Submodule names follow torchvision's state-dict names (`layer1.0.conv1` -> `layer1_0/conv1`,
`features.denseblock1.denselayer1.norm1` -> `denseblock1_denselayer1/norm1`,
`features.transition1.conv` -> `transition1_conv`). Every param carries logical axis names as in
`medjax.models.layers`. BatchNorm keeps running statistics in the 'batch_stats' collection:
call with `train=True` and `mutable=['batch_stats']` to update them (momentum 0.1 as PyTorch;
the running variance is the biased batch variance, as Flax computes it). Any input size >= 32
works (global average pooling); the head outputs `num_classes` logits.
"""
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxError
from medjax.models.layers import CONV_H
from medjax.models.layers import CONV_IN
from medjax.models.layers import CONV_OUT
from medjax.models.layers import CONV_W
from medjax.models.layers import EMBED
from medjax.models.layers import MLP
from medjax.models.layers import NORM

Dtype = Any

# torchvision's init: convs kaiming_normal(fan_out, relu), BN scale 1 / bias 0.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel_size: int, stride: int = 1, name: str | None = None,
         dtype: Dtype = jnp.float32) -> nn.Conv:
  """Bias-free conv with PyTorch's symmetric padding k // 2, kernel (h, w, in, out)."""
  p = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((p, p), (p, p)), use_bias=False, dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     _CONV_INIT, (CONV_H, CONV_W, CONV_IN, CONV_OUT)))


def batch_norm(train: bool, name: str | None = None, dtype: Dtype = jnp.float32) -> nn.BatchNorm:
  """PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax: 0.9), two-pass variance."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))


def head(num_classes: int, name: str, dtype: Dtype = jnp.float32) -> nn.Dense:
  return nn.Dense(
      num_classes, dtype=dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (EMBED, MLP)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (MLP,)))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 -> 3x3, identity or 1x1 projection shortcut."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.features, 3, self.stride, "conv1", self.dtype)(x)))
    y = bn(name="bn2")(conv(self.features, 3, 1, "conv2", self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      x = bn(name="downsample_1")(conv(self.features, 1, self.stride, "downsample_0",
                                       self.dtype)(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """ResNet-50 block (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = functools.partial(batch_norm, train, dtype=self.dtype)
    out = self.features * self.expansion
    y = nn.relu(bn(name="bn1")(conv(self.features, 1, 1, "conv1", self.dtype)(x)))
    y = nn.relu(bn(name="bn2")(conv(self.features, 3, self.stride, "conv2", self.dtype)(y)))
    y = bn(name="bn3")(conv(out, 1, 1, "conv3", self.dtype)(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = bn(name="downsample_1")(conv(out, 1, self.stride, "downsample_0", self.dtype)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision ResNet: 7x7/2 stem, max pool, 4 stages, global average pool, linear head."""
  block: Callable
  stage_sizes: Sequence[int]
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = conv(64, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, "bn1", self.dtype)(x))
    x = _max_pool_3x3_s2(x)
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(64 * 2 ** i, stride, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return head(self.num_classes, "fc", self.dtype)(x).astype(jnp.float32)


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 (bn_size * growth) -> BN-ReLU-3x3 (growth); output concatenated by the block."""
  growth_rate: int
  bn_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(batch_norm(train, "norm1", self.dtype)(x))
    y = conv(self.bn_size * self.growth_rate, 1, 1, "conv1", self.dtype)(y)
    y = nn.relu(batch_norm(train, "norm2", self.dtype)(y))
    return conv(self.growth_rate, 3, 1, "conv2", self.dtype)(y)


class DenseNet(nn.Module):
  """torchvision DenseNet (BC): stem, dense blocks joined by 1x1-conv + 2x2 avg-pool transitions."""
  block_config: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = conv(self.num_init_features, 7, 2, "conv0", self.dtype)(x)
    x = nn.relu(batch_norm(train, "norm0", self.dtype)(x))
    x = _max_pool_3x3_s2(x)
    for i, num_layers in enumerate(self.block_config):
      block = f"denseblock{i + 1}"
      for j in range(num_layers):
        y = DenseLayer(self.growth_rate, self.bn_size, self.dtype,
                       name=f"{block}_denselayer{j + 1}")(x, train)
        x = jnp.concatenate([x, y], axis=-1)
      if i != len(self.block_config) - 1:
        t = f"transition{i + 1}"
        x = nn.relu(batch_norm(train, f"{t}_norm", self.dtype)(x))
        x = conv(x.shape[-1] // 2, 1, 1, f"{t}_conv", self.dtype)(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(batch_norm(train, "norm5", self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return head(self.num_classes, "classifier", self.dtype)(x).astype(jnp.float32)


CLASSIFIERS = {
    "resnet18": functools.partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet50": functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    "densenet121": functools.partial(DenseNet, (6, 12, 24, 16), 32, 64, 4),
}


def make_classifier(name: str, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """A classifier from `CLASSIFIERS` with `num_classes` logits, computing in `dtype`.

  Params are created in fp32 whatever `dtype` is; logits are returned in fp32.
  """
  if name not in CLASSIFIERS:
    raise MedjaxError(f"unknown classifier {name!r}; choose one of {sorted(CLASSIFIERS)}")
  if num_classes < 1:
    raise MedjaxError(f"num_classes must be >= 1, got {num_classes}")
  return CLASSIFIERS[name](num_classes=num_classes, dtype=dtype)


HEAD_NAMES = ("fc", "classifier")


def init_variables(model: nn.Module, input_shape, seed: int = 0) -> dict:
  """{'params', 'batch_stats'} (unboxed, fp32) with torchvision's initialisation, from NumPy.

  The same distributions as torchvision: convs kaiming-normal (fan_out, relu gain), BN scale 1 /
  bias 0, the linear head U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, running
  stats 0 / 1. Drawn on the host from `np.random.default_rng(seed)` in sorted param order: no
  compile (a jitted `model.init` of a ResNet compiles for 10-30 s on CPU, mostly RNG code).
  `model.init` still works and uses the modules' own JAX initialisers.
  """
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape)[-3:], jnp.float32)
  shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, train=False),
                                   jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)
  out = {}
  for collection in ("params", "batch_stats"):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes.get(collection, {})))
    for path in sorted(flat):
      shape, leaf = flat[path].shape, path[-1]
      if collection == "batch_stats":
        value = np.ones(shape) if leaf == "var" else np.zeros(shape)
      elif path[0] in HEAD_NAMES:
        fan_in = flat[path[:-1] + ("kernel",)].shape[0]
        value = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
      elif leaf == "kernel":  # conv (kh, kw, in, out)
        value = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
      elif leaf == "scale":
        value = np.ones(shape)
      else:
        value = np.zeros(shape)
      out[(collection,) + path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(out)
