r"""Paper B's textual inversion (Chambon et al.): one new token `<lungxray>` on a few chest X-rays.

  python -m medjax.train --config=configs/cxr_ti_lungxray.py --workdir=/tmp/cxr_lungxray
      The embedded default: tiny phantom-trained SD, 5 chest X-ray phantoms, 64 px, a minute or
      two on CPU.
  python -m medjax.train --config=configs/cxr_ti_lungxray.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-v1-4 \
      --config.data.source=chexpert --config.data.root=/path/to/CheXpert-v1.0
      The protocol: SD 1.4 at 512 px, every image prompted "a photo of a <lungxray>"
      (data.prompt.kind='token'), a few frontal CheXpert images (5 with no finding).
      Paper B states neither steps, learning rate nor vectors: ours are diffusers'
      textual_inversion example's (3,000 steps, lr 5e-4, batch 1, 1 vector per token), and
      5 images (the few-shot count of the textual-inversion paper). summary.json lists each
      setting with its source (medjax.eval.provenance).
  Outputs: workdir/embeddings/diffusers/lungxray.safetensors (diffusers) and
  workdir/embeddings/a1111/lungxray.safetensors (AUTOMATIC1111).
  Arg options: paper, vectors=N, images=N (images with no finding to learn from).
"""
from medjax.config_args import ArgSpec
from medjax.train_config import base_config
from medjax.train_config import ti_paper_scale
from medjax.validation import int_at_least

ARG = ArgSpec(flags=("paper",), settings={"vectors": 1, "images": 5},
              rules={"vectors": int_at_least(1), "images": int_at_least(1)})


def get_config(arg: str = ""):
  opts = ARG.parse(arg, __file__)
  c = base_config()
  c.objective = "textual_inversion"
  c.textual_inversion.tokens = (("<lungxray>", "chest x-ray"),)
  c.textual_inversion.num_vectors = opts.vectors
  c.data.phantoms.kind = "cxr"
  c.data.classes = (("no_finding", {"No Finding": 1}),)
  c.data.per_class = opts.images
  c.data.prompt.kind = "token"  # every image: "a photo of a <lungxray>"
  c.data.prompt.token = "<lungxray>"
  c.data.prompt.token_template = "a photo of a {token}"
  c.learning_rate = 5e-3  # the tiny random model: a visible change within the default steps
  c.weight_decay = 0.0  # never on embeddings
  c.max_grad_norm = 0.0
  if opts.paper:
    ti_paper_scale(c, "chexpert", total_steps=3000)
    c.protocol = "paper_b"
    c.data.per_class = opts.images  # a few images, not paper A's 100 per class
    c.learning_rate = 5e-4  # diffusers' textual_inversion example (paper B states none)
  return c
