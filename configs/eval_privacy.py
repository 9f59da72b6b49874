r"""Privacy audit: are any generated images near-copies of training patients' images?

  python -m medjax.evaluate --config=configs/eval_privacy.py --workdir=/tmp/eval_privacy \
      --config.model.train_workdir=/runs/cxr_unet   (the generator to audit; or model.pretrained)
  For each generated image, its nearest training images by Inception features (searched also
  shifted and mirrored), then the best aligned pixel SSIM of the top candidates; flagged when
  closer than the held-out (test split) images' 1st-percentile distance or above their
  99th-percentile SSIM (medjax/eval/memorization.py). Writes results.json / results.md with the
  flagged pairs by record key, privacy_distances.png (histograms) and privacy_pairs.png.
  The embedded default (tiny model, phantoms, random Inception) runs in minutes on a CPU; use
  real weights (config.fid.weights) and hundreds of held-out images for a meaningful 1% rule.
"""
from medjax.eval.protocols import protocol_config


def get_config():
  c = protocol_config("privacy", "cxr", {
      "pleural_effusion": "a chest x-ray with pleural effusion",
      "no_finding": "a chest x-ray with no finding"})
  c.privacy.top_k = 3
  c.privacy.query_shifts = (0,)  # 2 Inception queries per image (mirrored) on a CPU
  return c
