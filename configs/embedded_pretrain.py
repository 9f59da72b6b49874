r"""The recipe of the embedded model's shipped weights: the tiny SD trained on phantoms.

  python -m medjax.reproduce --config=configs/embedded_pretrain.py --workdir=/tmp/embedded
      Stages (DIR/<stage>): vae (configs/cxr_vae.py on chest X-ray + prostate MRI phantoms),
      vae_model (its export, latent scale refitted on 1,024 train images), unet
      (configs/cxr_unet.py:text_encoder on those latents: U-Net + text encoder from random
      weights, the four class prompts, 10% empty prompts for guidance), model (its export),
      check_cxr and check_mri (eval_paper_b.py on fresh phantoms: VAE PSNR/SSIM on held-out
      images; a ResNet-18 trained on real phantoms at 64 px scoring 100 generated images per
      class). Writes DIR/results.md (the figures beside the targets) and
      DIR/embedded_tiny_sd.safetensors; copy that to medjax/weights/ to ship it.
      About 40 minutes on a 2-core CPU.
  The generators' phantoms (seed 7) are not the evaluations' (seed 0, the default of every
  other config), so no embedded evaluation scores images the model was trained on.
"""
import ml_collections

from medjax import embedded
from medjax import paper_tables
from medjax.config_args import ArgSpec
from medjax.data.defaults import default_config as data_config
from medjax.eval import protocols

CLASSES = (("pleural_effusion", {"Pleural Effusion": 1}), ("no_finding", {"No Finding": 1}),
           ("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
GENERATORS = ("vae", "unet")
ARG = ArgSpec()  # no options: one recipe


def _check(modality: str) -> ml_collections.ConfigDict:
  """eval_paper_b.py on `modality`'s fresh phantoms, with the issue's acceptance sizes."""
  positive, classes = protocols.CLASSES[modality]
  prompts = {name: embedded.CLASS_PROMPTS[name] for name, _ in classes}
  return paper_tables.stage(
      "evaluate", "eval_paper_b.py", pretrained="model", generator_workdirs=GENERATORS,
      own_data=True, changes={
          "data.phantoms.kind": modality, "data.phantoms.num": 1000,
          "data.split.sizes": (200, 100, 200), "data.classes": classes,
          "positive_class": positive, "generation.prompts": prompts,
          "generation.num_per_class": 100, "generation.num_inference_steps": 25,
          "generation.guidance_scale": 3.0, "generation.batch_size": 50,
          "classifier.image_size": 64, "classifier.num_steps": 300,
          "classifier.batch_size": 32, "recon.num_images": 100, "recon.batch_size": 25,
          "recon.resolutions": (64,), "bootstrap": 0})


def get_config(arg: str = ""):
  ARG.parse(arg, __file__)
  data = data_config()
  data.phantoms.kind = "cxr+mri"
  data.phantoms.num = 4000
  data.phantoms.seed = 7
  c = paper_tables.base_config("embedded", "The embedded tiny SD, trained on phantoms", data)
  c.stages.vae = paper_tables.stage("train", "cxr_vae.py", changes={
      # L2: L1 (a median) drops the MRI lesion, a few pixels of the image
      "model.embedded_random": True, "vae.loss": "l2", "data.classes": CLASSES,
      "total_steps": 4000,
      "sample_every_steps": 1000, "checkpoint_every_steps": 500, "log_every_steps": 100})
  c.stages.vae_model = paper_tables.stage("export", source="vae", fit_scaling_factor=1024)
  c.stages.unet = paper_tables.stage(
      "train", "cxr_unet.py", "text_encoder", pretrained="vae_model", changes={
          "data.classes": CLASSES, "data.prompt.kind": "class",
          "data.prompt.class_prompts": dict(embedded.CLASS_PROMPTS),
          "sample.prompts": tuple(embedded.CLASS_PROMPTS.values()),
          "unet.uncond_prob": 0.1, "cache_latents": True, "batch_size": 32,
          "learning_rate": 1e-3, "lr_schedule": "cosine", "warmup_steps": 200,
          "weight_decay": 0.0, "ema_decay": 0.999, "total_steps": 6000,
          "checkpoint_every_steps": 1000, "log_every_steps": 100,
          "sample_every_steps": 2000})
  c.stages.model = paper_tables.stage("export", source="unet")
  c.stages.check_cxr = _check("cxr")
  c.stages.check_mri = _check("mri")
  c.order = ("vae", "vae_model", "unet", "model", "check_cxr", "check_mri")
  c.notes = ("Ours: the recipe is medjax's own (no paper trains this model); the targets are "
             "issue 18's acceptance figures.",)
  return c
