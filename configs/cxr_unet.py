r"""Chest X-ray U-Net fine-tuning (paper B, Chambon et al.): prompts from labels, optional prior.

  python -m medjax.train --config=configs/cxr_unet.py --workdir=/tmp/cxr_unet
      The embedded default: tiny phantom-trained SD, chest X-ray phantoms (pleural effusion /
      no finding), 64 px, 60 steps; a few minutes on a 2-core CPU.
  python -m medjax.train --config=configs/cxr_unet.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-v1-4 \
      --config.data.source=chexpert --config.data.root=/path/to/CheXpert-v1.0
      The protocol: SD 1.4 at 512 x 512, frontal CheXpert/MIMIC images with label prompts.
  Arg options (comma-separated): paper, prior (DreamBooth prior preservation), mimic (MIMIC-CXR
  reports as prompts), text_encoder (also fine-tune CLIP).
"""
from medjax.config_args import ArgSpec
from medjax.train_config import base_config
from medjax.train_config import prior_preservation
from medjax.train_config import unet_paper_scale

ARG = ArgSpec(flags=("paper", "prior", "mimic", "text_encoder"))


def get_config(arg: str = ""):
  opts = ARG.parse(arg, __file__)
  c = base_config()
  c.objective = "unet"
  c.data.phantoms.kind = "cxr"
  c.data.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                   ("no_finding", {"No Finding": 1}))
  c.data.prompt.kind = "labels"  # 'a chest x-ray with pleural effusion' / '... with no finding'
  c.sample.prompts = ("a chest x-ray with pleural effusion", "a chest x-ray with no finding")
  c.learning_rate = 1e-4  # tiny random model: learns visibly in 60 steps
  if opts.paper:
    unet_paper_scale(c, "chexpert")
    c.protocol = "paper_b"
    c.sample.num_inference_steps, c.sample.guidance_scale = 75, 4.0  # RoentGen: 75 PNDM, g=4
    c.sample.scheduler = "pndm"
  if opts.prior:
    prior_preservation(c, "a chest x-ray", paper=opts.paper)
  if opts.mimic:
    c.data.source = "mimic"
    c.data.mimic.reports = True
    c.data.prompt.kind = "report"
  if opts.text_encoder:
    c.unet.train_text_encoder = True
  return c
