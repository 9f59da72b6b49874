r"""Paper A's chest X-ray protocol (CheXpert: pleural effusion vs no finding), as for MRI.

  python -m medjax.evaluate --config=configs/eval_paper_a_cxr.py --workdir=/tmp/eval_a_cxr
  python -m medjax.evaluate --config=configs/eval_paper_a_cxr.py:paper --workdir=... \
      --config.model.pretrained=/path/to/stable-diffusion-2-base \
      --config.model.train_workdir=/runs/cxr_ti   (or --config.model.embeddings=...) \
      --config.data.root=/path/to/CheXpert-v1.0 --config.fid.weights=... \
      --config.fid.allow_pickle=True
  Arg options: paper (the protocol at the papers' scale).
"""
from medjax.config_args import ArgSpec
from medjax.eval.protocols import paper_scale
from medjax.eval.protocols import protocol_config

ARG = ArgSpec(flags=("paper",))


def get_config(arg: str = ""):
  if ARG.parse(arg, __file__).paper:  # the tokens learned by configs/cxr_ti.py
    return paper_scale(protocol_config("paper_a", "cxr", {
        "pleural_effusion": "a chest x-ray with <effusion>",
        "no_finding": "a chest x-ray with <healthy-cxr>"}), "chexpert")
  return protocol_config("paper_a", "cxr", {
      "pleural_effusion": "a chest x-ray with pleural effusion",
      "no_finding": "a chest x-ray with no finding"})
