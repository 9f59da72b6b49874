"""pytorch-fid's InceptionV3 (`FIDInceptionV3`, 2048-d pool features) as a Flax Linen module.

This is the network pytorch-fid builds with `InceptionV3([3], use_fid_inception=True)`: the
TF-ported FID weights, its patched blocks (FIDInceptionA/C/E_1 average-pool without counting
the zero padding, FIDInceptionE_2 max-pools), BatchNorm with eps 0.001 in inference mode,
`resize_input` (bilinear to 299x299 as `F.interpolate(..., align_corners=False)`, no antialias)
and `normalize_input` ([0, 1] -> [-1, 1]). Output: the final average pool, [N, 2048].

Input is NHWC float in [0, 1]. Grayscale images ([..., 1]) are repeated to 3 channels, which
is what pytorch-fid sees when a grayscale PNG is opened with `.convert('RGB')`.

Submodule names follow torchvision/pytorch-fid (`Mixed_5b/branch5x5_1/conv`), so
`medjax.eval.inception_weights` maps the state dict 1:1. BatchNorm running statistics live in the
`batch_stats` collection (not folded into the convs), so the arithmetic follows PyTorch's.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.errors import MedjaxError
from medjax.models.layers import CONV_H
from medjax.models.layers import CONV_IN
from medjax.models.layers import CONV_OUT
from medjax.models.layers import CONV_W
from medjax.models.layers import NORM

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


def bilinear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                            np.ndarray]:
  """Source rows and weights of torch's bilinear resize (align_corners=False, size given).

  Mirrors ATen's CPU kernel bit for bit: scale = float32(in) / out; src = scale * (dst + 0.5)
  - 0.5 with one rounding to float32 (the kernel is compiled to a fused multiply-add; exact
  here in float64, then rounded), clamped at 0; neighbours floor(src) and the next one
  (clamped at the edge). Downsampling uses the same two taps (no antialias), as torch does.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  dst = np.arange(out_size, dtype=np.float64)
  src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0))
  i0 = np.floor(src).astype(np.int32)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = (np.float32(1) - w1).astype(np.float32)
  return i0, i1, w0, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC bilinear resize equal to `F.interpolate(x, size, mode='bilinear', align_corners=False)`.

  A gather of the two neighbours per axis (cost linear in the output), width then height, in
  the same order of products and sums as ATen's CPU kernel.
  """
  _, h, w, _ = x.shape
  if (h, w) == tuple(size):
    return x  # torch's weights are exactly (1, 0) here: the identity
  out = x
  for axis, (n_in, n_out) in ((2, (w, size[1])), (1, (h, size[0]))):
    i0, i1, w0, w1 = bilinear_indices(n_in, n_out)
    shape = [1, 1, 1, 1]
    shape[axis] = n_out
    w0 = jnp.asarray(w0, x.dtype).reshape(shape)
    w1 = jnp.asarray(w1, x.dtype).reshape(shape)
    out = jnp.take(out, i0, axis=axis) * w0 + jnp.take(out, i1, axis=axis) * w1
  return out


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU, torchvision's BasicConv2d."""
  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(
        self.features, self.kernel_size, strides=(self.stride, self.stride),
        padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision, name="conv",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.he_normal(), (CONV_H, CONV_W, CONV_IN, CONV_OUT)))(x)
    x = nn.BatchNorm(
        use_running_average=True, epsilon=BN_EPS, name="bn",
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (NORM,)))(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID patch: TF's average pool ignores the zero padding (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base for the mixed blocks: `c(name, features, kernel, stride, padding)` makes a conv."""
  precision: Any = "highest"

  def c(self, name: str, features: int, kernel: Sequence[int] = (1, 1), stride: int = 1,
        padding: Sequence[int] = (0, 0)) -> BasicConv2d:
    return BasicConv2d(features, tuple(kernel), stride, tuple(padding), self.precision, name=name)


class FIDInceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.c("branch1x1", 64)(x)
    b5 = self.c("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.c("branch5x5_1", 48)(x))
    b3 = self.c("branch3x3dbl_1", 64)(x)
    b3 = self.c("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.c("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.c("branch_pool", self.pool_features)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.c("branch3x3", 384, (3, 3), stride=2)(x)
    bd = self.c("branch3x3dbl_1", 64)(x)
    bd = self.c("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.c("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.c("branch1x1", 192)(x)
    b7 = self.c("branch7x7_1", c7)(x)
    b7 = self.c("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.c("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.c("branch7x7dbl_1", c7)(x)
    bd = self.c("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.c("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.c("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.c("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.c("branch_pool", 192)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.c("branch3x3_2", 320, (3, 3), stride=2)(self.c("branch3x3_1", 192)(x))
    b7 = self.c("branch7x7x3_1", 192)(x)
    b7 = self.c("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.c("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.c("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(_Block):
  """FIDInceptionE_1 (`max_pool=False`: average pool without padding) and E_2 (max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.c("branch1x1", 320)(x)
    b3 = self.c("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.c("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.c("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.c("branch3x3dbl_1", 448)(x)
    bd = self.c("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.c("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.c("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:
      # FID patch (E_2): a max pool here, padded with -inf as F.max_pool2d(padding=1).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = self.c("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's FID InceptionV3 up to the final average pool: NHWC [0, 1] -> [N, 2048].

  `precision` is that of every conv; 'highest' keeps fp32 (no TF32/bf16 passes on GPU/TPU) so
  features do not depend on the accelerator's default matmul precision.
  """
  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise MedjaxError(f"InceptionV3: expected NHWC images with 1 or 3 channels, got shape "
                        f"{tuple(x.shape)}")
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize_input:
      x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    if self.normalize_input:
      x = 2 * x - 1
    p = self.precision
    conv = lambda name, f, k, s=1, pad=(0, 0): BasicConv2d(f, k, s, pad, p, name=name)
    # Block 0: input -> first max pool.
    x = conv("Conv2d_1a_3x3", 32, (3, 3), 2)(x)
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = conv("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1))(x)
    x = _max_pool_3x3_s2(x)
    # Block 1: -> second max pool.
    x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool_3x3_s2(x)
    # Block 2: -> aux classifier input (768 channels).
    x = FIDInceptionA(p, pool_features=32, name="Mixed_5b")(x)
    x = FIDInceptionA(p, pool_features=64, name="Mixed_5c")(x)
    x = FIDInceptionA(p, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = FIDInceptionC(p, channels_7x7=c7, name=name)(x)
    # Block 3: -> final average pool.
    x = InceptionD(p, name="Mixed_7a")(x)
    x = FIDInceptionE(p, max_pool=False, name="Mixed_7b")(x)
    x = FIDInceptionE(p, max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))
