r"""Prostate MRI textual inversion (paper A on PI-CAI): T2W/ADC/HBV as RGB, slice labels.

  python -m medjax.train --config=configs/mri_ti.py --workdir=/tmp/mri_ti
      The embedded default: tiny phantom-trained SD, prostate MRI phantoms, 64 px, a few minutes
      on CPU.
  python -m medjax.train --config=configs/mri_ti.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.source=picai --config.data.root=/path/to/picai \
      --config.data.picai.cache_dir=/path/to/cache
      The protocol: SD 2.0 512-base, 100 slices per class (csPCa lesion / healthy), resampled
      to 3 x 0.5 x 0.5 mm, 30 x 300 x 300 centre crop, 512 px Lanczos, 64 vectors, 100k steps.
  Outputs, per token: workdir/embeddings/diffusers/<token>.safetensors (diffusers) and
  workdir/embeddings/a1111/<token>.safetensors (AUTOMATIC1111): cspca and healthy-prostate.
  Both tokens train in this one run, so each gets about half of the 100k steps; the paper
  trains them apart: `python -m medjax.reproduce --config=configs/paper_a_mri.py:paper`
  runs one training per token with the full steps each, on the evaluation's shared split.
  Arg options: paper, vectors=N.
"""
from medjax.config_args import ArgSpec
from medjax.train_config import base_config
from medjax.train_config import ti_paper_scale
from medjax.validation import int_at_least

ARG = ArgSpec(flags=("paper",), settings={"vectors": 64},  # paper A: 64 vectors were needed
              rules={"vectors": int_at_least(1)})


def get_config(arg: str = ""):
  opts = ARG.parse(arg, __file__)
  c = base_config()
  c.objective = "textual_inversion"
  c.textual_inversion.tokens = (("<cspca>", "prostate cancer"), ("<healthy-prostate>", "prostate"))
  c.textual_inversion.num_vectors = opts.vectors
  c.data.phantoms.kind = "mri"
  c.data.classes = (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
  c.data.prompt.kind = "class"
  c.data.prompt.class_prompts = {"diseased": "a prostate mri with <cspca>",
                                 "healthy": "a prostate mri with <healthy-prostate>"}
  c.sample.prompts = ("a prostate mri with <cspca>", "a prostate mri with <healthy-prostate>")
  c.learning_rate = 5e-3
  c.weight_decay = 0.0
  c.max_grad_norm = 0.0
  if opts.paper:
    c.protocol = "paper_a"
    ti_paper_scale(c, "picai", total_steps=100_000)
  return c
