"""AutoencoderKL against diffusers 0.42 (PyTorch) on a tiny, fully randomised VAE."""
import pathlib
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _torch_utils as tu  # pylint: disable=g-import-not-at-top,wrong-import-position

from medjax.convert.diffusers import params_to_state_dict, state_dict_to_params
from medjax.errors import MedjaxError
from medjax.models import AutoencoderKL, latent_sample

TINY = dict(in_channels=3, out_channels=3, block_out_channels=[16, 32],
            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)

FP32_TOL = 1e-4  # measured max abs error: mean 1.3e-6, logvar 1.0e-6, decode 4.1e-6
# Measured relative error of bf16 compute vs torch fp32: mean 1.1e-2, logvar 1.3e-2, decode
# 1.5e-2 (torch's own autocast-bf16: 1.2e-2, 1.3e-2, 1.6e-2).
BF16_REL_TOL = 3e-2


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  """A seeded random diffusers VAE, saved, loaded back, and its outputs on fixed inputs."""
  torch.manual_seed(0)
  torch_model = tu.randomize(TorchVAE(**TINY), seed=3)
  config, state_dict, path = tu.save_and_read(torch_model, tmp_path_factory.mktemp("vae"))
  module = AutoencoderKL.from_config(config)
  params = tu.load_params(module, state_dict, path, *module.dummy_inputs())
  rng = np.random.default_rng(4)
  images = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    dist = torch_model.encode(tu.nchw(images)).latent_dist
    decoded = torch_model.decode(tu.nchw(latents)).sample
  return types.SimpleNamespace(
      torch_model=torch_model, module=module, params=params, config=config,
      state_dict=state_dict, images=images, latents=latents, mean=tu.nhwc(dist.mean),
      logvar=tu.nhwc(dist.logvar), decoded=tu.nhwc(decoded))


def _encode_decode(module, params, images, latents):
  """Both methods in one jit: one compile per dtype."""
  def f(p, x, z):
    mean, logvar = module.apply({"params": p}, x, method="encode")
    return mean, logvar, module.apply({"params": p}, z, method="decode")
  return jax.jit(f)(params, images, latents)


def test_fp32_matches_diffusers(vae):
  mean, logvar, decoded = _encode_decode(vae.module, vae.params, vae.images, vae.latents)
  errs = {"mean": tu.max_abs_err(mean, vae.mean), "logvar": tu.max_abs_err(logvar, vae.logvar),
          "decode": tu.max_abs_err(decoded, vae.decoded)}
  assert max(errs.values()) <= FP32_TOL, errs


def test_bf16_compute_close_to_fp32(vae):
  module = AutoencoderKL.from_config(vae.config, dtype=jnp.bfloat16)
  mean, logvar, decoded = _encode_decode(module, vae.params, vae.images, vae.latents)
  assert mean.dtype == jnp.float32 and decoded.dtype == jnp.bfloat16
  errs = {"mean": tu.rel_err(mean, vae.mean), "logvar": tu.rel_err(logvar, vae.logvar),
          "decode": tu.rel_err(decoded, vae.decoded)}
  assert max(errs.values()) < BF16_REL_TOL, errs


def test_params_round_trip_bit_exact(vae):
  back = params_to_state_dict(vae.params)
  torch_sd = {k: v.numpy() for k, v in vae.torch_model.state_dict().items()}
  assert set(back) == set(torch_sd)
  for key, value in torch_sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_config_property_rebuilds_same_model(vae):
  assert AutoencoderKL.from_config(vae.module.config) == vae.module
  shapes = {k: tuple(v.shape)
            for k, v in TorchVAE.from_config(vae.module.config).state_dict().items()}
  assert shapes == {k: v.shape for k, v in vae.state_dict.items()}


# The real SD 1.x / 2.x vae/config.json.
SD_VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)


def test_full_size_layout_matches_diffusers():
  """Every full-size tensor name and shape, without allocating (meta tensors, eval_shape)."""
  with torch.device("meta"):
    torch_sd = TorchVAE(**SD_VAE_CONFIG).state_dict()
  zeros = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in torch_sd.items()}
  module = AutoencoderKL.from_config(SD_VAE_CONFIG)
  params = state_dict_to_params(zeros, tu.param_shapes(module, *module.dummy_inputs()),
                                source="vae")
  assert sum(p.size for p in jax.tree.leaves(params)) == 83_653_863


def test_latent_sample_is_keyed_gaussian():
  mean = jnp.full((2, 32, 32, 4), 0.5)
  logvar = jnp.full((2, 32, 32, 4), np.log(4.0))  # std 2
  sample = jax.jit(latent_sample)
  a = np.asarray(sample(mean, logvar, jax.random.key(0)))
  np.testing.assert_array_equal(a, sample(mean, logvar, jax.random.key(0)))
  assert not np.array_equal(a, sample(mean, logvar, jax.random.key(1)))
  assert abs(a.mean() - 0.5) < 0.1 and abs(a.std() - 2.0) < 0.1


def test_optional_parts_follow_config():
  config = dict(TINY, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=False)
  module = AutoencoderKL.from_config(config)
  names = set(tu.param_shapes(module, *module.dummy_inputs()))
  assert names == {"encoder", "decoder"}
  torch_keys = set(TorchVAE(**config).state_dict())
  ours = set(params_to_state_dict(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                   tu.param_shapes(module, *module.dummy_inputs()))))
  assert ours == torch_keys


def test_every_param_has_logical_axes():
  module = AutoencoderKL.from_config(TINY)
  boxed = tu.param_shapes(module, *module.dummy_inputs(), boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(b, nn.LogicallyPartitioned) for b in leaves)
  assert all(len(b.names) == b.value.ndim and None not in b.names for b in leaves)


@pytest.mark.parametrize("key,value", [
    ("foo_bar", 1),
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),  # wrong length
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("act_fn", "gelu"),
    ("_class_name", "AutoencoderTiny"),
])
def test_bad_config_names_the_key(key, value):
  with pytest.raises(MedjaxError, match=key):
    AutoencoderKL.from_config(dict(TINY, **{key: value}))


def test_bad_weights_name_the_tensor(vae):
  shapes = tu.param_shapes(vae.module, *vae.module.dummy_inputs())
  key = "encoder.mid_block.attentions.0.to_q.weight"
  missing = {k: v for k, v in vae.state_dict.items() if k != key}
  with pytest.raises(MedjaxError, match=f"missing.*{key}"):
    state_dict_to_params(missing, shapes, source="vae.safetensors")
  misshaped = dict(vae.state_dict, **{key: np.zeros((32, 16), np.float32)})
  with pytest.raises(MedjaxError, match=f"wrong shape.*{key}"):
    state_dict_to_params(misshaped, shapes, source="vae.safetensors")


def test_legacy_attention_names_load(vae):
  """VAEs saved before diffusers 0.14 name the mid attention query/key/value/proj_attn."""
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  legacy = {}
  for key, value in vae.state_dict.items():
    if ".mid_block.attentions." in key:
      for new, old in renames.items():
        key = key.replace(new, old)
    legacy[key] = value
  shapes = tu.param_shapes(vae.module, *vae.module.dummy_inputs())
  params = state_dict_to_params(legacy, shapes, source="old_vae.bin")
  jax.tree.map(np.testing.assert_array_equal, params, vae.params)
