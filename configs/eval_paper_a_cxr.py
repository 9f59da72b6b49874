r"""Paper A's chest X-ray protocol (CheXpert: pleural effusion vs no finding), as for MRI.

  python -m medjax.evaluate --config=configs/eval_paper_a_cxr.py --workdir=/tmp/eval_a_cxr
  python -m medjax.evaluate --config=configs/eval_paper_a_cxr.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.model.train_workdir=/runs/cxr_ti   (or --config.model.embeddings=...) \
      --config.data.root=/path/to/CheXpert-v1.0 --config.fid.weights=... --config.fid.allow_pickle=True
"""
from medjax.eval.protocols import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.protocol = "paper_a"
  c.positive_class = "pleural_effusion"
  c.data.phantoms.kind = "cxr"
  c.data.phantoms.num = 96
  c.data.classes = "pleural_effusion: Pleural Effusion=1; no_finding: No Finding=1"
  c.data.split.mode = "sizes"
  c.data.split.sizes = (24, 16, 16)
  c.generation.prompts = {"pleural_effusion": "a chest x-ray with pleural effusion",
                          "no_finding": "a chest x-ray with no finding"}
  if "paper" not in (arg or ""):
    return c
  c.generation.prompts = {"pleural_effusion": "a chest x-ray with <effusion>",
                          "no_finding": "a chest x-ray with <healthy-cxr>"}
  c.resolution = 512
  c.data.source = "chexpert"
  c.data.split.sizes = (200, 200, 200)
  c.generation.num_per_class = 1000
  c.generation.num_inference_steps = 50
  c.generation.batch_size = 16
  c.classifier.image_size = 196
  c.classifier.num_steps = 6250
  c.classifier.batch_size = 32
  c.classifier.progress = True
  c.repeats = 5
  c.fid.random_weights = False
  c.fid.max_images = 0
  c.fid.dims = 0
  c.fid.batch_size = 50
  c.bootstrap = 1000
  return c
