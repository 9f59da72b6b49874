"""LDM single-file checkpoints: our map against diffusers' own single-file importer."""
import types

import numpy as np
import pytest
import torch

from medjax.convert import single_file
from medjax.errors import MedjaxError

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

# Tiny SD1-style and SD2-style pipelines. Config entries the shapes don't determine (heads,
# norm groups, upcast) are passed to the importer explicitly, as a user would.
UNET = {
    "sd1": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8),
    "sd2": dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32, attention_head_dim=[2, 4, 4], norm_num_groups=8,
                use_linear_projection=True, transformer_layers_per_block=2,
                upcast_attention=True),
}
VAE = {
    "sd1": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2),
    "sd2": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3),
}
# SD2's text encoder keeps 23 of OpenCLIP-H's 24 layers; diffusers hard-codes that index.
TEXT = {
    "sd1": dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
    "sd2": dict(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=23,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"),
}
NOT_IN_SHAPES = {"unet": ("attention_head_dim", "norm_num_groups", "upcast_attention",
                          "sample_size"),
                 "vae": ("norm_num_groups",), "text_encoder": ("num_attention_heads",)}


def _numpy(module, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 1.0)
  return {k: v.numpy().copy() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request):
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  style = request.param
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT[style]))
  state_dicts = {"unet": _numpy(UNet2DConditionModel(**UNET[style]), 0),
                 "vae": _numpy(AutoencoderKL(**VAE[style]), 1),
                 "text_encoder": _numpy(text, 2)}  # transformers 5: no 'text_model.' prefix
  configs = {"unet": UNET[style], "vae": VAE[style], "text_encoder": TEXT[style]}
  overrides = {c: {k: configs[c][k] for k in keys if k in configs[c]}
               for c, keys in NOT_IN_SHAPES.items()}
  return style, state_dicts, configs, overrides


def _canonical_text(sd):
  return {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in sd.items()}


def _assert_same(got, want, what):
  assert sorted(got) == sorted(want), (what, sorted(set(got) ^ set(want))[:5])
  for key, value in want.items():
    g = np.asarray(got[key])
    assert g.shape == value.shape and np.array_equal(g, value), (what, key)


def test_diffusers_reads_our_export_back(pipe):
  style, state_dicts, configs, _ = pipe
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  as_torch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.items()}
  unet = sfu.convert_ldm_unet_checkpoint(as_torch, dict(configs["unet"]))
  _assert_same({k: v.numpy() for k, v in unet.items()}, state_dicts["unet"], "unet")
  vae = sfu.convert_ldm_vae_checkpoint(as_torch, dict(configs["vae"]))
  _assert_same({k: v.numpy() for k, v in vae.items()}, state_dicts["vae"], "vae")
  if style == "sd1":
    text = sfu.convert_ldm_clip_checkpoint(as_torch)
  else:
    assert {k for k in ckpt if k.endswith("in_proj_weight")}  # OpenCLIP's fused q/k/v
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=32))
    text = sfu.convert_open_clip_checkpoint(model, as_torch, prefix=single_file.OPEN_CLIP_PREFIX)
  _assert_same({k: v.numpy() for k, v in text.items()},
               _canonical_text(state_dicts["text_encoder"]), "text_encoder")


def test_ldm_key_names(pipe):
  style, state_dicts, configs, _ = pipe
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in ckpt
  assert "model.diffusion_model.middle_block.1.proj_in.weight" in ckpt
  assert ckpt["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
  if style == "sd1":
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in ckpt  # upsampler, no attn
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in ckpt
  else:
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ckpt  # after attention
    assert ckpt["cond_stage_model.model.positional_embedding"].shape == (77, 32)
    # The padded 24th block is all zeros (identity), as SD2 reads the 23rd's output.
    pad = [k for k in ckpt if ".resblocks.23." in k]
    assert len(pad) == 12 and all(not ckpt[k].any() for k in pad)


def test_import_gives_back_state_dicts_and_configs(pipe):
  _, state_dicts, configs, overrides = pipe
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  ckpt["alphas_cumprod"] = np.ones(10, np.float32)  # schedule buffers are skipped
  got, got_configs = single_file.ldm_to_diffusers(ckpt, configs=overrides)
  _assert_same(got["unet"], state_dicts["unet"], "unet")
  _assert_same(got["vae"], state_dicts["vae"], "vae")
  _assert_same(got["text_encoder"], _canonical_text(state_dicts["text_encoder"]), "text")
  for name in ("unet", "vae", "text_encoder"):
    for key, value in configs[name].items():
      want = list(value) if isinstance(value, tuple) else value
      assert got_configs[name][key] == want, (name, key)
  sd2 = configs["text_encoder"]["hidden_act"] == "gelu"
  assert got_configs["tokenizer"]["pad_token"] == ("!" if sd2 else "<|endoftext|>")


def test_imported_components_load_into_medjax_models(pipe):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from medjax import models  # pylint: disable=g-import-not-at-top
  from medjax.convert.diffusers import state_dict_to_params  # pylint: disable=g-import-not-at-top
  from medjax.models import clip  # pylint: disable=g-import-not-at-top
  _, state_dicts, configs, overrides = pipe
  got, got_configs = single_file.ldm_to_diffusers(
      single_file.diffusers_to_ldm(state_dicts, configs), configs=overrides)
  for name, cls in (("unet", models.UNet2DConditionModel), ("vae", models.AutoencoderKL),
                    ("text_encoder", clip.CLIPTextModel)):
    module = cls.from_config(got_configs[name], source=name)
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda m=module: m.init(jax.random.PRNGKey(0), *m.dummy_inputs())))["params"]
    state_dict_to_params(got[name], shapes, source=name)


def test_ema_weights(pipe):
  _, state_dicts, configs, overrides = pipe
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  for key in [k for k in ckpt if k.startswith(single_file.UNET_PREFIX)]:
    ckpt["model_ema." + "".join(key.split(".")[1:])] = ckpt[key] + 1
  plain, _ = single_file.ldm_to_diffusers(ckpt, configs=overrides)
  ema, _ = single_file.ldm_to_diffusers(ckpt, configs=overrides, ema=True)
  _assert_same(plain["unet"], state_dicts["unet"], "unet")
  _assert_same(ema["unet"], {k: v + 1 for k, v in state_dicts["unet"].items()}, "ema")
  del ckpt["model_ema.diffusion_modelinput_blocks00weight"]
  with pytest.raises(MedjaxError, match="input_blocks.0.0.weight"):
    single_file.ldm_to_diffusers(ckpt, configs=overrides, ema=True)


def test_files_and_pickle_opt_in(pipe, tmp_path):
  style, state_dicts, configs, overrides = pipe
  if style != "sd1":
    pytest.skip("file handling is layout independent")
  path = tmp_path / "model.safetensors"
  single_file.save_single_file(path, state_dicts, configs)
  got, _ = single_file.load_single_file(path, configs=overrides)
  _assert_same(got["vae"], state_dicts["vae"], "vae")

  ckpt = {k: torch.from_numpy(np.array(v)) for k, v in single_file.read_checkpoint(path).items()}
  pickled = tmp_path / "model.ckpt"
  torch.save({"state_dict": ckpt, "global_step": 1}, pickled)
  with pytest.raises(MedjaxError, match="allow_pickle"):
    single_file.load_single_file(pickled, configs=overrides)
  got, _ = single_file.load_single_file(pickled, allow_pickle=True, configs=overrides)
  _assert_same(got["unet"], state_dicts["unet"], "unet")

  with pytest.raises(MedjaxError, match="no such"):
    single_file.read_checkpoint(tmp_path / "missing.safetensors")
  (tmp_path / "model.gguf").write_bytes(b"x")
  with pytest.raises(MedjaxError, match="unknown checkpoint type"):
    single_file.read_checkpoint(tmp_path / "model.gguf")
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(MedjaxError, match="truncated"):
    single_file.read_checkpoint(truncated)


def test_unsupported_checkpoints_are_named(pipe):
  _, state_dicts, configs, overrides = pipe
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  with pytest.raises(MedjaxError, match="conditioner.embedders.1"):
    single_file.ldm_to_diffusers({**ckpt, "conditioner.embedders.1.model.x": np.zeros(1)})
  with pytest.raises(MedjaxError, match="label_emb"):
    single_file.ldm_to_diffusers({**ckpt, "model.diffusion_model.label_emb.0.0.weight":
                                  np.zeros((4, 4))})
  with pytest.raises(MedjaxError, match="fit no known layer"):
    single_file.ldm_to_diffusers({**ckpt, "first_stage_model.encoder.extra.weight": np.zeros(1)},
                                 configs=overrides)
  broken = {k: v for k, v in ckpt.items() if not k.startswith("first_stage_model.decoder.conv_in")}
  with pytest.raises(MedjaxError, match="not an LDM VAE"):
    single_file.ldm_to_diffusers(broken)
  broken = {k: v for k, v in ckpt.items() if "mlp.c_fc" not in k and "mlp.fc1" not in k}
  with pytest.raises(MedjaxError, match="incomplete"):
    single_file.ldm_to_diffusers(broken)
  no_text = {k: v for k, v in ckpt.items() if not k.startswith("cond_stage_model.")}
  with pytest.raises(MedjaxError, match="neither"):
    single_file.ldm_to_diffusers(no_text)


# The hub configs of SD 1.5 and SD 2.1 (the entries the shapes decide, plus the defaults).
REAL = {
    "sd1": dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                attention_head_dim=8, use_linear_projection=False, text_layers=12,
                text_hidden=768, text_heads=12),
    "sd2": dict(block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=1024,
                attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                text_layers=23, text_hidden=1024, text_heads=16),
}


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_full_size_layout_and_configs(style):
  """Full-size SD shapes (meta tensors, zero-stride arrays): configs and diffusers' detection."""
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  real = REAL[style]
  unet_config = dict(cross_attention_dim=real["cross_attention_dim"],
                     attention_head_dim=real["attention_head_dim"],
                     use_linear_projection=real["use_linear_projection"])
  text_config = dict(hidden_size=real["text_hidden"], intermediate_size=4 * real["text_hidden"],
                     num_hidden_layers=real["text_layers"], num_attention_heads=real["text_heads"],
                     hidden_act="gelu" if style == "sd2" else "quick_gelu")
  with torch.device("meta"):
    modules = {"unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
               "text_encoder": transformers.CLIPTextModel(
                   transformers.CLIPTextConfig(**text_config))}
  state_dicts = {n: {k: np.broadcast_to(np.float16(0), v.shape)
                     for k, v in m.state_dict().items()} for n, m in modules.items()}
  configs = {"unet": dict(modules["unet"].config), "vae": dict(modules["vae"].config),
             "text_encoder": modules["text_encoder"].config.to_dict()}
  ckpt = single_file.diffusers_to_ldm(state_dicts, configs)
  assert sfu.infer_diffusers_model_type(ckpt) == {"sd1": "v1", "sd2": "v2"}[style]
  got, got_configs = single_file.ldm_to_diffusers(ckpt)
  unet = got_configs["unet"]
  for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim",
              "use_linear_projection"):
    assert unet[key] == real[key], key
  assert unet["layers_per_block"] == 2 and unet["in_channels"] == 4
  assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
  text = got_configs["text_encoder"]
  assert (text["num_hidden_layers"], text["num_attention_heads"]) == (real["text_layers"],
                                                                      real["text_heads"])
  assert got_configs["vae"]["block_out_channels"] == [128, 256, 512, 512]
  assert {n: sorted(sd) for n, sd in got.items()} == {
      n: sorted(_canonical_text(sd) if n == "text_encoder" else sd)
      for n, sd in state_dicts.items()}
