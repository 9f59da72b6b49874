"""The PyTorch side of benchmarks/train_step.py: diffusers' example training steps.

Run in train_step.py's `--worker=torch` subprocess (its docstring says what each step kind does
on both sides); a module of its own so train_step.py stays one screenful of concepts.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pipelines  # pylint: disable=g-import-not-at-top,wrong-import-position
import unet as unet_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from train_step import BETAS  # pylint: disable=g-import-not-at-top,wrong-import-position
from train_step import EPS
from train_step import FT_PROMPT
from train_step import INIT_WORD
from train_step import LR
from train_step import TI_PROMPT
from train_step import TOKEN
from train_step import WEIGHT_DECAY
from train_step import images
from train_step import parse_kind
from train_step import run_steps


def run_torch(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from diffusers import DDPMScheduler  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextModel, CLIPTokenizer  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  kind, n = parse_kind(args.kinds)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  weight_dtype = torch.bfloat16 if args.bf16 else torch.float32
  path = args.path
  t0 = time.perf_counter()
  tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
  noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
  text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
  vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
  unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
  vae.requires_grad_(False)

  if kind == "ti":
    # examples/textual_inversion/textual_inversion.py
    placeholder_tokens = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)]
    if tokenizer.add_tokens(placeholder_tokens) != n:
      raise RuntimeError(f"tokenizer already has {TOKEN}")
    initializer_token_id = tokenizer.encode(INIT_WORD, add_special_tokens=False)[0]
    placeholder_token_ids = tokenizer.convert_tokens_to_ids(placeholder_tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
      for token_id in placeholder_token_ids:
        token_embeds[token_id] = token_embeds[initializer_token_id].clone()
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5: flattened
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if args.bf16:  # the script casts the frozen U-Net and VAE; the text encoder stays fp32
      unet.to(weight_dtype)
      vae.to(weight_dtype)
    text_encoder.to(device).train()
    unet.to(device)
    vae.to(device)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=LR,
                                  betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    prompt = TI_PROMPT.format(" ".join(placeholder_tokens))
    lo, hi = min(placeholder_token_ids), max(placeholder_token_ids)
  else:
    # examples/text_to_image/train_text_to_image.py
    text_encoder.requires_grad_(False)
    if args.bf16:  # the script casts the frozen text encoder and VAE; the U-Net stays fp32
      text_encoder.to(weight_dtype)
      vae.to(weight_dtype)
    text_encoder.to(device)
    vae.to(device)
    unet.to(device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY, eps=EPS)
    prompt = FT_PROMPT
  setup_s = time.perf_counter() - t0
  input_ids = tokenizer([prompt] * args.batch, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt"
                        ).input_ids.to(device)
  pixel_values = torch.from_numpy(images(args.batch, pipelines.RESOLUTION[args.configs])).permute(
      0, 3, 1, 2).contiguous().to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
  holder = {}

  def noisy_latents():
    with torch.no_grad():
      latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample()
      latents = latents * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), device=device).long()
    return noise_scheduler.add_noise(latents, noise, timesteps), noise, timesteps

  def ti_step():
    noisy, noise, timesteps = noisy_latents()
    with autocast():
      encoder_hidden_states = text_encoder(input_ids)[0].to(dtype=weight_dtype)
      model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
    index_no_updates[lo:hi + 1] = False
    with torch.no_grad():
      text_encoder.get_input_embeddings().weight[index_no_updates] = (
          orig_embeds_params[index_no_updates])
    holder["loss"] = loss.item()
    sync()

  def ft_step():
    noisy, noise, timesteps = noisy_latents()
    with torch.no_grad():
      encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
    with autocast():
      model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    holder["loss"] = loss.item()
    sync()

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  out = run_steps(ti_step if kind == "ti" else ft_step, args.warmup, args.repeats,
                  args.malloc_trim)
  out["peak_bytes"] = (torch.cuda.max_memory_allocated() if device == "cuda"
                       else unet_bench.peak_host_bytes())
  out.update(setup_s=setup_s, loss=holder["loss"], device=device,
             threads=torch.get_num_threads())
  return out
