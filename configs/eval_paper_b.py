r"""Paper B's chest X-ray evaluation: VAE reconstruction table and a classifier on generations.

  python -m medjax.evaluate --config=configs/eval_paper_b.py --workdir=/tmp/eval_b
  python -m medjax.evaluate --config=configs/eval_paper_b.py:paper --workdir=... \
      --config.model.train_workdir=/runs/cxr_unet   (a fine-tuned U-Net; or model.pretrained) \
      --config.data.root=/path/to/CheXpert-v1.0 --config.fid.weights=... --config.fid.allow_pickle=True
  The protocol: 512 x 512 frontal CXRs; RMSE / PSNR / SSIM / MS-SSIM and FID of the VAE's
  reconstructions; a DenseNet-121 trained on real images scores generated images per prompt class
  (paper: ~95% accuracy, AUC ~0.98 for pleural effusion with the best fine-tuned U-Net);
  sampling as RoentGen: 75 PNDM steps, guidance 4.
"""
from medjax.eval.protocols import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.protocol = "paper_b"
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
  c.resolution = 512
  c.data.source = "chexpert"
  c.data.split.mode = "source"
  c.generation.num_per_class = 500
  c.generation.num_inference_steps = 75
  c.generation.guidance_scale = 4.0
  c.generation.scheduler = "pndm"
  c.generation.batch_size = 16
  c.classifier.model = "densenet121"
  c.classifier.image_size = 224
  c.classifier.num_steps = 6250
  c.classifier.batch_size = 32
  c.classifier.progress = True
  c.recon.num_images = 1000
  c.recon.batch_size = 8
  c.fid.random_weights = False
  c.fid.max_images = 0
  c.fid.dims = 0
  c.fid.batch_size = 50
  return c
