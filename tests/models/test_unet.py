"""UNet2DConditionModel against diffusers 0.42 (PyTorch) on tiny, fully randomised models."""
import copy
import pathlib
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _torch_utils as tu  # pylint: disable=g-import-not-at-top,wrong-import-position

from medjax.convert.diffusers import params_to_state_dict, state_dict_to_params
from medjax.errors import MedjaxError
from medjax.models import UNet2DConditionModel

# SD 1.x layout: conv proj_in, one int head count, flip_sin_to_cos, freq_shift 0.
SD1 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
           attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
# SD 2.x layout: linear projections, per-block head counts (reversed on the way up), upcast
# attention, another text width; plus the non-default time embedding options.
SD2 = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
           attention_head_dim=[2, 4], cross_attention_dim=24, norm_num_groups=16,
           use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False,
           freq_shift=1)
# Inpainting-style input, per-block lists, only-cross-attention, centred input, and a latent
# size that does not halve evenly (9 x 7 -> 5 x 4, upsampled back to the skip's 9 x 7).
ODD = dict(sample_size=[9, 7], in_channels=9, out_channels=4, block_out_channels=(16, 32),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=[2, 1],
           transformer_layers_per_block=[2, 1], only_cross_attention=[True, False],
           attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8,
           center_input_sample=True)

# name -> (config, (height, width), timesteps as the caller passes them)
CASES = {"sd1": (SD1, (8, 8), np.array([3, 917])),
         "sd2": (SD2, (8, 8), 421.5),
         "odd": (ODD, (9, 7), np.array([0.5, 999.0], np.float32))}

# Measured max abs error in fp32 (outputs up to ~3.7): sd1 5.0e-6, sd2 6.8e-6, odd 2.1e-6.
FP32_TOL = 1e-4
# Measured ||ours in bf16 - torch fp32|| / ||torch fp32||: sd1 1.5e-2, sd2 1.6e-2, odd 1.2e-2;
# torch's own autocast-bf16 error on the same models: 1.4e-2, 1.4e-2, 1.0e-2.
BF16_REL_TOL = 3e-2


def _apply(module, params, *args):
  return jax.jit(lambda p, *a: module.apply({"params": p}, *a))(params, *args)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  """A seeded random diffusers U-Net, saved and loaded back into the Flax module."""
  config, (h, w), timesteps = CASES[request.param]
  torch.manual_seed(0)
  torch_model = tu.randomize(TorchUNet(**config), seed=1)
  saved, state_dict, path = tu.save_and_read(torch_model, tmp_path_factory.mktemp(request.param))
  module = UNet2DConditionModel.from_config(saved)
  params = tu.load_params(module, state_dict, path, *module.dummy_inputs())
  rng = np.random.default_rng(2)
  sample = rng.standard_normal((2, h, w, config["in_channels"])).astype(np.float32)
  text = rng.standard_normal((2, 5, module.cross_attention_dim)).astype(np.float32)
  with torch.no_grad():
    t = torch.from_numpy(timesteps) if isinstance(timesteps, np.ndarray) else timesteps
    expected = tu.nhwc(torch_model(tu.nchw(sample), t, torch.from_numpy(text)).sample)
  return types.SimpleNamespace(name=request.param, torch_model=torch_model, module=module,
                               params=params, state_dict=state_dict, config=saved,
                               inputs=(sample, timesteps, text), expected=expected)


def test_fp32_matches_diffusers(case):
  out = _apply(case.module, case.params, *case.inputs)
  assert out.shape == case.expected.shape
  err = tu.max_abs_err(out, case.expected)
  assert err <= FP32_TOL, f"{case.name}: max abs error {err:.2e}"


def test_params_round_trip_bit_exact(case):
  back = params_to_state_dict(case.params)
  torch_sd = {k: v.numpy() for k, v in case.torch_model.state_dict().items()}
  assert set(back) == set(torch_sd)
  for key, value in torch_sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_config_property_rebuilds_same_model(case):
  assert UNet2DConditionModel.from_config(case.module.config) == case.module
  torch_again = TorchUNet.from_config(case.module.config)
  shapes = {k: tuple(v.shape) for k, v in torch_again.state_dict().items()}
  assert shapes == {k: v.shape for k, v in case.state_dict.items()}


@pytest.mark.parametrize("name", ["sd2", pytest.param("sd1", marks=pytest.mark.slow)])
def test_bf16_compute_close_to_fp32(case, name):
  if case.name != name:
    pytest.skip("one bf16 compile per layout")
  module = UNet2DConditionModel.from_config(case.config, dtype=jnp.bfloat16)
  shapes = tu.param_shapes(module, *module.dummy_inputs())
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))  # params stay fp32
  out = _apply(module, case.params, *case.inputs)
  assert out.dtype == jnp.bfloat16
  err = tu.rel_err(out, case.expected)
  assert err < BF16_REL_TOL, f"{case.name}: bf16 relative error {err:.2e}"


# The real SD 1.5 and SD 2.1 unet/config.json files (as saved by diffusers).
SD15_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False, cross_attention_dim=768, downsample_padding=1,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
    norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21_CONFIG = dict(
    SD15_CONFIG, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
    use_linear_projection=True, upcast_attention=True, dual_cross_attention=False,
    num_class_embeds=None, only_cross_attention=False, class_embed_type=None,
    resnet_time_scale_shift="default")


@pytest.mark.parametrize("config,num_params", [(SD15_CONFIG, 859_520_964),
                                               (SD21_CONFIG, 865_910_724)], ids=["sd15", "sd21"])
def test_full_size_layout_matches_diffusers(config, num_params):
  """Every full-size tensor name and shape, without allocating (meta tensors, eval_shape)."""
  with torch.device("meta"):
    torch_sd = TorchUNet(**config).state_dict()
  zeros = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in torch_sd.items()}
  module = UNet2DConditionModel.from_config(config)
  params = state_dict_to_params(zeros, tu.param_shapes(module, *module.dummy_inputs()),
                                source="unet")
  assert sum(p.size for p in jax.tree.leaves(params)) == num_params


# One cross-attention block, no resampling: the smallest model that has every block kind.
TINY = dict(block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2,
            cross_attention_dim=8, norm_num_groups=8)


def _tiny_remat_pair():
  plain = UNet2DConditionModel.from_config(TINY)
  remat = UNet2DConditionModel.from_config(TINY, remat=True)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 4, 4), np.float32)
  text = rng.standard_normal((1, 3, 8), np.float32)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32),
                        tu.param_shapes(plain, x, 7, text))
  return plain, remat, params, (x, 7, text)


def test_remat_same_params_and_output():
  plain, remat, params, args = _tiny_remat_pair()
  assert jax.tree.structure(tu.param_shapes(remat, *args)) == jax.tree.structure(params)
  np.testing.assert_array_equal(_apply(remat, params, *args), _apply(plain, params, *args))


@pytest.mark.slow  # two backward compiles: 20-70 s on 2 busy cores
def test_remat_same_gradients():
  plain, remat, params, args = _tiny_remat_pair()

  def value_and_grad(module):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(module.apply({"params": p}, *args) ** 2)))(params)

  (value, grads), (value_r, grads_r) = value_and_grad(plain), value_and_grad(remat)
  assert value == value_r
  # Recomputed activations may fuse differently, so gradients agree to fp32 rounding, not to
  # the bit (measured: 2.4e-7 with gradients up to 15.9); tolerance relative to the largest.
  grads, grads_r = jax.tree.leaves(grads), jax.tree.leaves(grads_r)
  scale = max(float(np.max(np.abs(g))) for g in grads)
  diff = max(float(np.max(np.abs(np.asarray(g) - np.asarray(g_r)))) for g, g_r in zip(grads, grads_r))
  assert diff <= 1e-6 * scale, f"max gradient difference {diff:.2e} (largest gradient {scale:.2e})"


def test_every_param_has_logical_axes():
  module = UNet2DConditionModel.from_config(SD2)
  boxed = tu.param_shapes(module, *module.dummy_inputs(), boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(b, nn.LogicallyPartitioned) for b in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim and None not in box.names
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: x is None)
  assert None not in specs


@pytest.mark.parametrize("key,value", [
    ("foo_bar", 1),                                      # unknown key
    ("resnet_time_scale_shift", "scale_shift"),          # known key, unsupported value
    ("class_embed_type", "timestep"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),  # unsupported block type
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("attention_head_dim", [2, 4, 8]),                   # wrong list length
    ("num_attention_heads", 8),
    ("_class_name", "UNet2DModel"),
])
def test_bad_config_names_the_key(key, value):
  config = dict(copy.deepcopy(SD1), **{key: value})
  with pytest.raises(MedjaxError, match=key):
    UNet2DConditionModel.from_config(config)


def test_bad_weights_name_the_tensor():
  module = UNet2DConditionModel.from_config(SD1)
  shapes = tu.param_shapes(module, *module.dummy_inputs())
  good = params_to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

  missing = {k: v for k, v in good.items() if k != key}
  with pytest.raises(MedjaxError, match=f"missing.*{key}"):
    state_dict_to_params(missing, shapes, source="unet.safetensors")

  misshaped = dict(good, **{key: np.zeros((64, 24), np.float32)})  # SD2's text width
  with pytest.raises(MedjaxError, match=f"wrong shape.*{key}"):
    state_dict_to_params(misshaped, shapes, source="unet.safetensors")

  extra = dict(good, **{"add_embedding.linear_1.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(MedjaxError, match="unexpected.*add_embedding"):
    state_dict_to_params(extra, shapes, source="unet.safetensors")
