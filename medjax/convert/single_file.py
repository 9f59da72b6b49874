"""Original single-file Stable Diffusion checkpoints <-> diffusers-named state dicts.

The LDM/CompVis layout (`model.diffusion_model.*`, `first_stage_model.*`, and
`cond_stage_model.transformer.*` for SD1's CLIP-L or `cond_stage_model.model.*` for SD2's
OpenCLIP-H) is what the AUTOMATIC1111 web UI, ComfyUI and civitai files use. One name map per
component, built from the diffusers config, serves both directions; the U-Net, VAE and text
encoder configs are inferred from tensor shapes where shapes determine them, and the rest
(head counts, norm groups, ...) default to Stable Diffusion's values unless given explicitly.
The names and tensor layouts follow diffusers 0.42's `loaders/single_file_utils.py`.
NumPy only: no torch, no diffusers.
"""
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medjax.convert import weights
from medjax.errors import MedjaxError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."   # SD1: OpenAI CLIP-L in transformers layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."     # SD2: OpenCLIP ViT-H
EMA_PREFIX = "model_ema."
# Parts of LDM checkpoints that no inference component uses: the EMA copy (unless asked for),
# the VAE's training loss (LPIPS, discriminator), OpenCLIP's contrastive temperature and the
# token-position buffer. Top-level names without a dot (betas, alphas_cumprod, ...) are the
# noise schedule's buffers, also skipped.
_SKIPPED_PREFIXES = (EMA_PREFIX, VAE_PREFIX + "loss.", OPEN_CLIP_PREFIX + "logit_scale",
                     CLIP_PREFIX + "text_model.embeddings.position_ids")
_SUFFIXES_PICKLE = (".ckpt", ".pt", ".pth", ".bin")

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
           ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                  ("to_out.0", "proj_out"))
_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"),
                    ("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"),
                    ("self_attn.v_proj", "attn.v_proj"))


class Rule(NamedTuple):
  """Module `diffusers` <-> module `ldm` (prefixes ending in '.', or exact keys otherwise).

  `renames` rename submodules inside it; `conv1x1` lists the diffusers submodules whose linear
  weights LDM stores as 1x1 convolutions ([out, in] <-> [out, in, 1, 1]).
  """
  diffusers: str
  ldm: str
  renames: tuple[tuple[str, str], ...] = ()
  conv1x1: tuple[str, ...] = ()


# -- the name maps ------------------------------------------------------------------------------

def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
  """U-Net name map (UNet2DConditionModel <-> LDM `openaimodel.UNetModel`) for `config`."""
  levels, nrb = len(config["block_out_channels"]), _int_layers(config)
  down, up = config["down_block_types"], config["up_block_types"]
  rules = [Rule("time_embedding.linear_1.", "time_embed.0."),
           Rule("time_embedding.linear_2.", "time_embed.2."),
           Rule("conv_in.", "input_blocks.0.0."), Rule("conv_norm_out.", "out.0."),
           Rule("conv_out.", "out.2."),
           Rule("mid_block.resnets.0.", "middle_block.0.", _RESNET),
           Rule("mid_block.attentions.0.", "middle_block.1."),
           Rule("mid_block.resnets.1.", "middle_block.2.", _RESNET)]
  k = 1
  for i in range(levels):
    for j in range(nrb):
      rules.append(Rule(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _RESNET))
      if down[i].startswith("CrossAttn"):
        rules.append(Rule(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
      k += 1
    if i < levels - 1:
      rules.append(Rule(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
      k += 1
  k = 0
  for i in range(levels):
    attn = up[i].startswith("CrossAttn")
    for j in range(nrb + 1):
      rules.append(Rule(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _RESNET))
      if attn:
        rules.append(Rule(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
      if j == nrb and i < levels - 1:
        rules.append(Rule(f"up_blocks.{i}.upsamplers.0.conv.",
                          f"output_blocks.{k}.{2 if attn else 1}.conv."))
      k += 1
  return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
  """VAE name map (AutoencoderKL <-> LDM `AutoencoderKL` encoder/decoder) for `config`."""
  levels, nrb = len(config["block_out_channels"]), config.get("layers_per_block", 1)
  rules = [Rule("quant_conv.", "quant_conv."), Rule("post_quant_conv.", "post_quant_conv.")]
  for part in ("encoder", "decoder"):
    rules += [Rule(f"{part}.conv_in.", f"{part}.conv_in."),
              Rule(f"{part}.conv_out.", f"{part}.conv_out."),
              Rule(f"{part}.conv_norm_out.", f"{part}.norm_out."),
              Rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
              Rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
              Rule(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION,
                   ("to_q", "to_k", "to_v", "to_out.0"))]
  for i in range(levels):
    for j in range(nrb):
      rules.append(Rule(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                        _VAE_RESNET))
    if i < levels - 1:
      rules.append(Rule(f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                        f"encoder.down.{i}.downsample.conv."))
    b = levels - 1 - i  # LDM numbers decoder levels from the lowest resolution up
    for j in range(nrb + 1):
      rules.append(Rule(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{b}.block.{j}.",
                        _VAE_RESNET))
    if i < levels - 1:
      rules.append(Rule(f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                        f"decoder.up.{b}.upsample.conv."))
  return rules


def open_clip_rules(num_layers: int) -> list[Rule]:
  """SD2 text encoder (CLIP layout) <-> OpenCLIP's text tower (q/k/v shown unfused here)."""
  rules = [Rule("text_model.embeddings.token_embedding.", "token_embedding."),
           Rule("text_model.embeddings.position_embedding.weight", "positional_embedding"),
           Rule("text_model.final_layer_norm.", "ln_final.")]
  rules += [Rule(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.",
                 _OPEN_CLIP_LAYER) for i in range(num_layers)]
  return rules


def _translate(state_dict: Mapping[str, np.ndarray], rules: list[Rule], *, to_ldm: bool,
               source: str) -> dict[str, np.ndarray]:
  """Renames every key by its longest matching rule; a key no rule covers is an error."""
  src = {(r.diffusers if to_ldm else r.ldm): r for r in rules}
  out, unmatched = {}, []
  for key, value in state_dict.items():
    parts = key.split(".")
    candidates = [key] + [".".join(parts[:n]) + "." for n in range(len(parts) - 1, 0, -1)]
    prefix = next((p for p in candidates if p in src and (p == key or p.endswith("."))), None)
    if prefix is None:
      unmatched.append(key)
      continue
    rule = src[prefix]
    rest = key[len(prefix):]
    module = None
    for diffusers_name, ldm_name in rule.renames:
      a, b = (diffusers_name, ldm_name) if to_ldm else (ldm_name, diffusers_name)
      if rest.startswith(a + "."):
        rest, module = b + rest[len(a):], diffusers_name
        break
    value = np.asarray(value)
    if module in rule.conv1x1 and rest.endswith("weight"):
      value = value.reshape(value.shape[:2] + (1, 1)) if to_ldm else value.reshape(value.shape[:2])
    out[(rule.ldm if to_ldm else rule.diffusers) + rest] = value
  if unmatched:
    raise MedjaxError(f"{source}: {len(unmatched)} tensors fit no known layer for this config "
                      f"(e.g. {', '.join(sorted(unmatched)[:5])})")
  return out


# -- config inference ---------------------------------------------------------------------------

def _indices(keys, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: Mapping[str, np.ndarray], source: str = "unet") -> dict:
  """UNet2DConditionModel config from LDM U-Net tensors (prefix removed)."""
  if any(k.startswith("label_emb.") for k in sd):
    raise MedjaxError(f"{source}: has class/added embeddings (label_emb: SDXL, upscaler); "
                      "medjax imports SD 1.x/2.x U-Nets only")
  if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
    raise MedjaxError(f"{source}: not an LDM U-Net (no input_blocks.0.0 / out.2 weights)")
  n_in = len(_indices(sd, r"input_blocks\.(\d+)\."))
  downs = _indices(sd, r"input_blocks\.(\d+)\.0\.op\.weight$")
  levels = len(downs) + 1
  nrb, rem = divmod(n_in - 1 - len(downs), levels)
  if rem or nrb < 1:
    raise MedjaxError(f"{source}: {n_in} input blocks do not form an SD U-Net")
  firsts = [1 + i * (nrb + 1) for i in range(levels)]
  channels = [int(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0]) for k in firsts]
  down = ["CrossAttnDownBlock2D" if f"input_blocks.{k}.1.proj_in.weight" in sd else "DownBlock2D"
          for k in firsts]
  up = ["CrossAttnUpBlock2D" if f"output_blocks.{i * (nrb + 1)}.1.proj_in.weight" in sd
        else "UpBlock2D" for i in range(levels)]
  attn = [k for k in firsts if f"input_blocks.{k}.1.proj_in.weight" in sd]
  proj_in = sd[f"input_blocks.{attn[0]}.1.proj_in.weight" if attn
               else "middle_block.1.proj_in.weight"]
  depth = [len(_indices(sd, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")) or None
           for k in firsts]  # None: a block without attention
  depth = ([d or 1 for d in depth] if len(set(depth) - {None}) > 1
           else next((d for d in depth if d), 1))
  to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
  linear = proj_in.ndim == 2
  return {
      "_class_name": "UNet2DConditionModel", "sample_size": 64,
      "in_channels": int(sd["input_blocks.0.0.weight"].shape[1]),
      "out_channels": int(sd["out.2.weight"].shape[0]),
      "down_block_types": down, "up_block_types": up, "block_out_channels": channels,
      "layers_per_block": nrb, "cross_attention_dim": int(to_k.shape[1]),
      # Not in the shapes: SD1 has 8 heads, SD2 64-channel heads (diffusers' convention).
      "attention_head_dim": [c // 64 for c in channels] if linear else 8,
      "use_linear_projection": linear,
      "transformer_layers_per_block": depth,
      "upcast_attention": False, "norm_num_groups": 32,
  }


def infer_vae_config(sd: Mapping[str, np.ndarray], source: str = "vae") -> dict:
  """AutoencoderKL config from LDM VAE tensors (prefix removed)."""
  if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
    raise MedjaxError(f"{source}: not an LDM VAE (no encoder/decoder conv_in)")
  levels = len(_indices(sd, r"encoder\.down\.(\d+)\."))
  latent = int(sd["decoder.conv_in.weight"].shape[1])
  if "post_quant_conv.weight" in sd and sd["post_quant_conv.weight"].shape[:2] != (latent, latent):
    raise MedjaxError(f"{source}: embed_dim != z_channels is not supported")
  return {
      "_class_name": "AutoencoderKL", "sample_size": 512,
      "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
      "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
      "down_block_types": ["DownEncoderBlock2D"] * levels,
      "up_block_types": ["UpDecoderBlock2D"] * levels,
      "block_out_channels": [int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
                             for i in range(levels)],
      "layers_per_block": len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
      "latent_channels": latent, "norm_num_groups": 32, "scaling_factor": 0.18215,
      "use_quant_conv": "quant_conv.weight" in sd,
      "use_post_quant_conv": "post_quant_conv.weight" in sd,
      "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
  }


def _text_config(vocab: int, hidden: int, positions: int, inner: int, layers: int,
                 act: str) -> dict:
  # CLIP vocabularies end with <|startoftext|>, <|endoftext|>; SD's heads are 64 wide.
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
          "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inner,
          "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1),
          "max_position_embeddings": positions, "hidden_act": act, "layer_norm_eps": 1e-5,
          "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": 1,
          "attention_dropout": 0.0}


def infer_text_encoder_config(sd: Mapping[str, np.ndarray], open_clip: bool) -> dict:
  """CLIPTextConfig dict from SD1 CLIP (`text_model.*`) or SD2 OpenCLIP tensors (prefix removed).

  For OpenCLIP, the last resblock is left out: SD2 conditions on the penultimate layer.
  """
  if open_clip:
    tok, inner = sd["token_embedding.weight"], sd["transformer.resblocks.0.mlp.c_fc.weight"]
    layers = len(_indices(sd, r"transformer\.resblocks\.(\d+)\.")) - 1
    return _text_config(tok.shape[0], tok.shape[1], sd["positional_embedding"].shape[0],
                        inner.shape[0], layers, "gelu")
  tok = sd["text_model.embeddings.token_embedding.weight"]
  return _text_config(tok.shape[0], tok.shape[1],
                      sd["text_model.embeddings.position_embedding.weight"].shape[0],
                      sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                      len(_indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")), "quick_gelu")


def _int_layers(config) -> int:
  n = config.get("layers_per_block", 2)
  if isinstance(n, (list, tuple)):
    if len(set(n)) != 1:
      raise MedjaxError("a different layers_per_block per block has no LDM layout")
    n = n[0]
  return int(n)


# -- LDM -> diffusers ---------------------------------------------------------------------------

def _split(checkpoint: Mapping[str, np.ndarray], ema: bool, source: str) -> dict[str, dict]:
  parts = {"unet": {}, "vae": {}, "clip": {}, "open_clip": {}}
  prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": CLIP_PREFIX,
              "open_clip": OPEN_CLIP_PREFIX}
  unknown = []
  for key, value in checkpoint.items():
    if "." not in key or key.startswith(_SKIPPED_PREFIXES):
      continue
    part = next((p for p, pre in prefixes.items() if key.startswith(pre)), None)
    if part is None:
      unknown.append(key)
    else:
      key = key[len(prefixes[part]):]
      if part == "clip" and not key.startswith("text_model."):
        key = "text_model." + key  # transformers' flattened CLIPTextModel layout
      parts[part][key] = value
  if unknown and not any(parts.values()):  # e.g. one component of a diffusers folder
    raise MedjaxError(f"{source}: is a file; expected a diffusers pipeline directory or an SD "
                      f"single-file checkpoint, and it holds neither ({sorted(unknown)[0]}, ...)")
  if unknown:
    raise MedjaxError(f"{source}: {len(unknown)} tensors of an unsupported model part (medjax "
                      f"reads SD 1.x/2.x: {UNET_PREFIX}, {VAE_PREFIX}, {CLIP_PREFIX}, "
                      f"{OPEN_CLIP_PREFIX}), e.g. {', '.join(sorted(unknown)[:5])}")
  if ema:
    flat = {k.replace(".", ""): k for k in parts["unet"]}
    ema_keys = {k[len(EMA_PREFIX):] for k in checkpoint if k.startswith(EMA_PREFIX)}
    missing = [k for k in flat if "diffusion_model" + k not in ema_keys]
    if missing:
      raise MedjaxError(f"{source}: ema=True but {len(missing)} U-Net tensors have no "
                        f"{EMA_PREFIX} copy (e.g. {flat[missing[0]]})")
    parts["unet"] = {k: checkpoint[EMA_PREFIX + "diffusion_model" + f] for f, k in flat.items()}
  for name in ("unet", "vae"):
    if not parts[name]:
      raise MedjaxError(f"{source}: no {name} tensors ({prefixes[name]}*); not an SD checkpoint")
  if bool(parts["clip"]) == bool(parts["open_clip"]):
    raise MedjaxError(f"{source}: expected one text encoder ({CLIP_PREFIX}* for SD1 or "
                      f"{OPEN_CLIP_PREFIX}* for SD2), found "
                      f"{'both' if parts['clip'] else 'neither'}")
  return parts


def ldm_to_diffusers(checkpoint: Mapping[str, np.ndarray], *,
                     configs: Mapping[str, Mapping[str, Any]] | None = None, ema: bool = False,
                     source: str = "checkpoint") -> tuple[dict[str, dict], dict[str, dict]]:
  """Splits an LDM single-file state dict into diffusers-named components.

  Args:
    checkpoint: LDM names -> arrays (any dtype; kept as is).
    configs: per component ('unet', 'vae', 'text_encoder'), config entries that override the
      inferred ones (e.g. attention_head_dim, norm_num_groups, upcast_attention, sample_size).
    ema: take the U-Net from the `model_ema.*` copy.
    source: named in errors.

  Returns:
    (state_dicts, configs): {'unet', 'vae', 'text_encoder'} -> diffusers state dict, and the
    same keys -> config dict, plus 'tokenizer' -> `write_clip_tokenizer` keyword args (SD2 pads
    with '!').
  """
  configs = configs or {}
  parts = _split(checkpoint, ema, source)
  open_clip = bool(parts["open_clip"])
  try:
    inferred = {
        "unet": infer_unet_config(parts["unet"], f"{source} ({UNET_PREFIX}*)"),
        "vae": infer_vae_config(parts["vae"], f"{source} ({VAE_PREFIX}*)"),
        "text_encoder": infer_text_encoder_config(parts["open_clip"] or parts["clip"], open_clip),
    }
  except (KeyError, StopIteration) as e:
    raise MedjaxError(f"{source}: incomplete SD checkpoint, cannot infer the configs "
                      f"(missing {e or 'cross-attention weights'})") from e
  out_configs = {name: {**c, **dict(configs.get(name, {}))} for name, c in inferred.items()}
  state_dicts = {
      "unet": _translate(parts["unet"], unet_rules(out_configs["unet"]), to_ldm=False,
                         source=f"{source} ({UNET_PREFIX}*)"),
      "vae": _translate(parts["vae"], vae_rules(out_configs["vae"]), to_ldm=False,
                        source=f"{source} ({VAE_PREFIX}*)"),
  }
  text = out_configs["text_encoder"]
  if open_clip:
    sd = _unfuse_qkv(_drop_open_clip_extras(parts["open_clip"], text["num_hidden_layers"]))
    state_dicts["text_encoder"] = _translate(sd, open_clip_rules(text["num_hidden_layers"]),
                                             to_ldm=False, source=f"{source} ({OPEN_CLIP_PREFIX}*)")
  else:
    state_dicts["text_encoder"] = dict(parts["clip"])
  out_configs["tokenizer"] = {"pad_token": "!" if open_clip else "<|endoftext|>",
                              "model_max_length": text["max_position_embeddings"]}
  return state_dicts, out_configs


def _drop_open_clip_extras(sd: Mapping[str, np.ndarray], num_layers: int) -> dict:
  """Leaves out what SD2 never runs: the last resblock and the contrastive text projection."""
  last = f"transformer.resblocks.{num_layers}."
  return {k: v for k, v in sd.items() if not k.startswith(last) and k != "text_projection"}


def _unfuse_qkv(sd: Mapping[str, np.ndarray]) -> dict:
  out = {}
  for key, value in sd.items():
    m = re.fullmatch(r"(.*\.attn\.)in_proj_(weight|bias)", key)
    if m is None:
      out[key] = value
      continue
    for name, part in zip("qkv", np.split(np.asarray(value), 3, axis=0), strict=True):
      out[f"{m.group(1)}{name}_proj.{m.group(2)}"] = part
  return out


def _fuse_qkv(sd: Mapping[str, np.ndarray]) -> dict:
  out = dict(sd)
  for key in [k for k in sd if re.fullmatch(r".*\.attn\.q_proj\.(weight|bias)", k)]:
    head, leaf = key.rsplit(".q_proj.", 1)
    out[f"{head}.in_proj_{leaf}"] = np.concatenate(
        [np.asarray(out.pop(f"{head}.{n}_proj.{leaf}")) for n in "qkv"], axis=0)
  return out


# -- diffusers -> LDM ---------------------------------------------------------------------------

def diffusers_to_ldm(state_dicts: Mapping[str, Mapping[str, np.ndarray]],
                     configs: Mapping[str, Mapping[str, Any]], *,
                     text_encoder_layout: str = "auto") -> dict[str, np.ndarray]:
  """diffusers component state dicts -> one LDM single-file state dict.

  Args:
    state_dicts: {'unet', 'vae', 'text_encoder'} -> diffusers/transformers state dicts (text
      encoder keys with or without the 'text_model.' prefix).
    configs: their configs (the U-Net and VAE maps depend on block counts).
    text_encoder_layout: 'clip' (SD1), 'open_clip' (SD2), or 'auto': OpenCLIP when the text
      encoder's hidden_act is 'gelu' (OpenAI's CLIP uses quick_gelu).

  For OpenCLIP the file gets what SD2's loader expects but diffusers drops: a final resblock
  (all zeros: an identity block; SD2 conditions on the layer before it) and an identity
  `text_projection`, so `ldm_to_diffusers` and diffusers' own importer read it back unchanged.
  """
  if text_encoder_layout == "auto":
    text_encoder_layout = ("open_clip" if configs["text_encoder"].get("hidden_act") == "gelu"
                           else "clip")
  if text_encoder_layout not in ("clip", "open_clip"):
    raise MedjaxError(f"text_encoder_layout={text_encoder_layout!r}: expected 'auto', 'clip' "
                      "or 'open_clip'")
  out = {}
  for name, prefix, rules in (("unet", UNET_PREFIX, unet_rules(configs["unet"])),
                              ("vae", VAE_PREFIX, vae_rules(configs["vae"]))):
    sd = _translate(state_dicts[name], rules, to_ldm=True, source=f"{name} state dict")
    out.update({prefix + k: v for k, v in sd.items()})
  text = {(k if k.startswith("text_model.") else "text_model." + k): np.asarray(v)
          for k, v in state_dicts["text_encoder"].items()
          if not k.endswith("embeddings.position_ids")}
  if text_encoder_layout == "clip":
    out.update({CLIP_PREFIX + k: v for k, v in text.items()})
    return out
  n = len(_indices(text, r"text_model\.encoder\.layers\.(\d+)\."))
  sd = _fuse_qkv(_translate(text, open_clip_rules(n), to_ldm=True,
                            source="text_encoder state dict"))
  for key in [k for k in sd if k.startswith("transformer.resblocks.0.")]:
    sd[key.replace(".resblocks.0.", f".resblocks.{n}.", 1)] = np.zeros_like(sd[key])
  width = sd["token_embedding.weight"].shape[1]
  sd["text_projection"] = np.eye(width, dtype=sd["token_embedding.weight"].dtype)
  out.update({OPEN_CLIP_PREFIX + k: v for k, v in sd.items()})
  return out


# -- files --------------------------------------------------------------------------------------

def read_checkpoint(path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` checkpoint, or a pickle (`.ckpt`, `.pt`, ...) only on opt-in."""
  path = Path(path)
  if not path.is_file():
    raise MedjaxError(f"{path}: no such checkpoint file")
  if path.suffix == ".safetensors":
    return weights.read_safetensors(path)
  if path.suffix in _SUFFIXES_PICKLE:
    return weights.read_torch_pickle(path, allow_pickle=allow_pickle)
  raise MedjaxError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors, "
                    f"or {', '.join(_SUFFIXES_PICKLE)} with allow_pickle=True)")


def load_single_file(path, *, allow_pickle: bool = False,
                     configs: Mapping[str, Mapping[str, Any]] | None = None,
                     ema: bool = False) -> tuple[dict[str, dict], dict[str, dict]]:
  """`read_checkpoint` + `ldm_to_diffusers` (see there for `configs`, `ema` and the result)."""
  return ldm_to_diffusers(read_checkpoint(path, allow_pickle=allow_pickle), configs=configs,
                          ema=ema, source=str(path))


def save_single_file(path, state_dicts: Mapping[str, Mapping[str, np.ndarray]],
                     configs: Mapping[str, Mapping[str, Any]], *,
                     text_encoder_layout: str = "auto", dtype=None,
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes `diffusers_to_ldm(...)` as one `.safetensors` file (atomically), cast to `dtype`,
  with `metadata` beside 'format': 'pt'."""
  if Path(path).suffix != ".safetensors":
    raise MedjaxError(f"{path}: medjax writes single files as .safetensors only")
  sd = diffusers_to_ldm(state_dicts, configs, text_encoder_layout=text_encoder_layout)
  if dtype is not None:
    sd = {k: v.astype(dtype) for k, v in sd.items()}
  weights.write_safetensors(sd, path, metadata={"format": "pt", **(metadata or {})})
