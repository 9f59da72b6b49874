r"""Paper A's prostate MRI protocol: ResNet-18 on N real vs N real + M synthetic vs synthetic only.

  python -m medjax.evaluate --config=configs/eval_paper_a_mri.py --workdir=/tmp/eval_a_mri
      The embedded default: tiny random SD, MRI phantoms, small sizes (minutes on a CPU).
  python -m medjax.evaluate --config=configs/eval_paper_a_mri.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.model.embeddings='/runs/mri_ti/embeddings/diffusers/cspca.safetensors;/runs/mri_ti/embeddings/diffusers/healthy-prostate.safetensors' \
      --config.data.root=/path/to/picai --config.data.picai.cache_dir=/path/to/cache \
      --config.fid.weights=/path/to/pt_inception-2015-12-05-6726825d.pth --config.fid.allow_pickle=True
      The protocol: 200/200/200 real slices (train/val/test), 2,000 synthetic (1,000 per class,
      from the learned tokens), ResNet-18, lr 1e-4, batch 32, 6,250 steps, 196 x 196 input,
      5 repeats (paper: real 0.780 +- 0.017, real+synthetic 0.803 +- 0.009, synthetic 0.766).
"""
from medjax.eval.protocols import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.protocol = "paper_a"
  c.positive_class = "diseased"
  c.data.phantoms.kind = "mri"
  c.data.phantoms.num = 96
  c.data.classes = "diseased: csPCa=1; healthy: csPCa=0"
  c.data.split.mode = "sizes"
  c.data.split.sizes = (24, 16, 16)
  c.generation.prompts = {"diseased": "a prostate mri with <cspca>",
                          "healthy": "a prostate mri with <healthy-prostate>"}
  c.generation.num_per_class = 8
  if "paper" not in (arg or ""):
    # Embedded default: no embeddings trained yet, so plain class prompts.
    c.generation.prompts = {"diseased": "a prostate mri with clinically significant cancer",
                            "healthy": "a prostate mri with no lesion"}
    return c
  c.resolution = 512
  c.data.source = "picai"
  c.data.split.sizes = (200, 200, 200)
  c.generation.num_per_class = 1000
  c.generation.num_inference_steps = 50
  c.generation.batch_size = 16
  c.classifier.image_size = 196
  c.classifier.num_steps = 6250
  c.classifier.batch_size = 32
  c.classifier.learning_rate = 1e-4
  c.classifier.progress = True
  c.repeats = 5
  c.fid.random_weights = False
  c.fid.max_images = 0
  c.fid.dims = 0
  c.fid.batch_size = 50
  c.bootstrap = 1000
  return c
