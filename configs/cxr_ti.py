r"""Chest X-ray textual inversion (paper A, de Wilde et al.): one 64-vector token per class.

  python -m medjax.train --config=configs/cxr_ti.py --workdir=/tmp/cxr_ti
      The embedded default: tiny phantom-trained SD, chest X-ray phantoms, 64 px, a few minutes
      on CPU.
  python -m medjax.train --config=configs/cxr_ti.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.data.source=chexpert --config.data.root=/path/to/CheXpert-v1.0
      The protocol: SD 2.0 512-base, 100 CheXpert images per class (pleural effusion / no
      finding), 64 vectors per token, 50k steps, AUTOMATIC1111's embedding learning rate.
  Outputs, per token: workdir/embeddings/diffusers/<token>.safetensors (diffusers) and
  workdir/embeddings/a1111/<token>.safetensors (AUTOMATIC1111), e.g. embeddings/diffusers/
  effusion.safetensors and healthy-cxr.safetensors; use them with `python -m medjax.sample
  --embeddings=...` or `--config.model.embeddings=...` of configs/eval_paper_a_cxr.py.
  Both tokens train in this one run, so each gets about half of the 50k steps; the paper
  trains them apart: `python -m medjax.reproduce --config=configs/paper_a_cxr.py:paper`
  runs one training per token with the full steps each, on the evaluation's shared split.
  Arg options: paper, vectors=N (e.g. vectors=8 for the ablation).
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
  c.textual_inversion.tokens = (("<effusion>", "pleural effusion"),
                                ("<healthy-cxr>", "normal chest"))
  c.textual_inversion.num_vectors = opts.vectors
  c.data.phantoms.kind = "cxr"
  c.data.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                   ("no_finding", {"No Finding": 1}))
  c.data.prompt.kind = "class"
  c.data.prompt.class_prompts = {"pleural_effusion": "a chest x-ray with <effusion>",
                                 "no_finding": "a chest x-ray with <healthy-cxr>"}
  c.learning_rate = 5e-3  # AUTOMATIC1111's default embedding learning rate
  c.weight_decay = 0.0  # never on embeddings (objectives masks it anyway)
  c.max_grad_norm = 0.0
  if opts.paper:
    c.protocol = "paper_a"
    ti_paper_scale(c, "chexpert", total_steps=50_000)  # 100k for prostate MRI
  return c
