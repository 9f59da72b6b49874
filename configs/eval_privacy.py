r"""Privacy audit: are any generated images near-copies of training patients' images?

  python -m medjax.evaluate --config=configs/eval_privacy.py --workdir=/tmp/eval_privacy \
      --config.model.train_workdir=/runs/cxr_unet   (the generator to audit; or model.pretrained)
  python -m medjax.evaluate --config=configs/eval_privacy.py:paper --workdir=... \
      --config.model.train_workdir=... --config.data.root=/path/to/CheXpert-v1.0 \
      --config.fid.weights=... --config.fid.allow_pickle=True
  For each generated image, its nearest training images (the generator's own, from its training
  workdirs; the real train split when unknown) by Inception features (searched also mirrored,
  and shifted with `privacy.query_shifts`), then the best aligned pixel SSIM of the top
  candidates; flagged when closer than the held-out (test split) images' lower 0.5% tail or
  above their upper 0.5% SSIM tail: a 1% false-positive budget (`privacy.percentile`) split
  between the two rules (medjax/eval/memorization.py). Writes results.json / results.md with the
  flagged pairs by record key, privacy_distances.png (histograms) and privacy_pairs.png. The
  embedded default (tiny model, phantoms, random Inception) runs in minutes on a CPU; the 1%
  bound needs real weights and 199+ held-out images. Paper A and B run the same audit after
  generation (`privacy.enabled`).
  Arg options: paper (512 px CheXpert in its own splits, 1,000 images per class, real Inception
  weights, shifted queries).
"""
from medjax.config_args import ArgSpec
from medjax.eval.protocols import paper_scale
from medjax.eval.protocols import protocol_config

ARG = ArgSpec(flags=("paper",))


def get_config(arg: str = ""):
  paper = ARG.parse(arg, __file__).paper
  c = protocol_config("privacy", "cxr", {
      "pleural_effusion": "a chest x-ray with pleural effusion",
      "no_finding": "a chest x-ray with no finding"})
  if not paper:
    c.privacy.features = "inception"  # a random Inception without weights (fid.weights)
    return c
  c = paper_scale(c, "chexpert")
  c.data.split.mode = "source"
  return c
