r"""Paper B's chest X-ray evaluation: VAE reconstruction table and a classifier on generations.

  python -m medjax.evaluate --config=configs/eval_paper_b.py --workdir=/tmp/eval_b
  python -m medjax.evaluate --config=configs/eval_paper_b.py:paper --workdir=... \
      --config.model.train_workdir=/runs/cxr_unet   (a fine-tuned U-Net; or model.pretrained) \
      --config.data.root=/path/to/CheXpert-v1.0 --config.fid.weights=... \
      --config.fid.allow_pickle=True
  The protocol: 512 x 512 frontal CXRs in CheXpert's own splits (valid.csv as the test split,
  a seeded 10% of the train patients as val: config.data.split.source_test='val', as
  CheXpert-v1.0-small has no test.csv); RMSE / PSNR / SSIM / MS-SSIM and FID of the VAE's
  reconstructions at 256, 512 and 768 px (config.recon.resolutions); a DenseNet-121 trained
  on real images scores generated images per prompt class (paper: ~95% accuracy, AUC ~0.98
  for pleural effusion with the best fine-tuned U-Net); sampling as RoentGen: 75 PNDM steps,
  guidance 4.
  Arg options: paper (the protocol at the papers' scale).
"""
from medjax.config_args import ArgSpec
from medjax.eval.protocols import paper_scale
from medjax.eval.protocols import protocol_config

ARG = ArgSpec(flags=("paper",))


def get_config(arg: str = ""):
  paper = ARG.parse(arg, __file__).paper
  c = protocol_config("paper_b", "cxr", {
      "pleural_effusion": "a chest x-ray with pleural effusion",
      "no_finding": "a chest x-ray with no finding"})
  c.recon.resolutions = (32, 64)  # the VAE table's row groups (multiples of the VAE factor 8)
  if not paper:
    return c
  c = paper_scale(c, "chexpert")
  c.data.split.mode = "source"
  # CheXpert-v1.0-small has no test.csv: valid.csv is the test split, val 10% of train patients
  c.data.split.source_test = "val"
  c.generation.num_per_class = 500
  c.generation.num_inference_steps = 75
  c.generation.guidance_scale = 4.0
  c.generation.scheduler = "pndm"
  c.classifier.model = "densenet121"
  c.classifier.image_size = 224
  c.recon.num_images = 1000
  c.recon.batch_size = 8
  c.recon.resolutions = (256, 512, 768)
  c.repeats = 1
  c.bootstrap = 0
  return c
