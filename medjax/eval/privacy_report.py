"""The privacy audit as a step of an evaluation, and its report.

`audit_store` audits the generated images of a protocol (paper A, paper B, or the 'privacy'
protocol alone) with `medjax.eval.memorization`: against the images the generator trained on
(`image_sets.generator_train`), calibrated on a real held-out split it never saw. It returns the
results.json section (counts, thresholds, the flagged pairs by record key only, the figures'
names); `rows` are its results.md rows; process 0 draws the two PNGs: the NN distance
histograms and the closest generated / training pairs side by side.
"""
import dataclasses
import math
import time
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from PIL import ImageDraw

from medjax import hosts
from medjax import images as images_lib
from medjax.atomic import atomic_path
from medjax.errors import MedjaxError
from medjax.eval import image_sets
from medjax.eval import image_store
from medjax.eval import memorization as mem
from medjax.eval.protocol_parts import fmt
from medjax.eval.protocol_parts import inception_params

FIGURES = {"histograms": "privacy_distances.png", "gallery": "privacy_pairs.png"}
TITLE = "Privacy audit: near-copies of training images"


def check_config(p: Any) -> mem.Options:
  """`config.privacy` checked (before anything slow): its audit options."""
  if p.features not in ("inception", "pixels"):
    raise MedjaxError(f"config.privacy.features={p.features!r}: expected 'inception' or 'pixels'")
  if not isinstance(p.heldout_through_vae, bool):
    raise MedjaxError(f"config.privacy.heldout_through_vae={p.heldout_through_vae!r}: expected "
                      "True or False")
  if isinstance(p.power_probes, bool) or not isinstance(p.power_probes, int) or (
      p.power_probes < 0):
    raise MedjaxError(f"config.privacy.power_probes={p.power_probes!r}: expected a count >= 0 "
                      "(training images whose VAE round trips measure the audit's power)")
  if p.heldout_split not in ("val", "test"):
    raise MedjaxError(f"config.privacy.heldout_split={p.heldout_split!r}: expected 'val' or "
                      "'test' (real images the generator never trained on)")
  opt = mem.Options.from_config(p)
  opt.check()
  return opt


def audit_store(config: Any, synth, train, workdir, mesh=None, params=None, held=None,
                sd=None) -> dict:
  """`run` on the images the generator trained on (`image_sets.generator_train`; the
  evaluation's real train split `train` when unknown) and the real held-out split
  `config.privacy.heldout_split` (`held`, or read from the data), passed through `sd`'s VAE
  with `config.privacy.heldout_through_vae`: the results.json section."""
  check_config(config.privacy)
  split = config.privacy.heldout_split
  name, images, notes = image_sets.generator_train(config, train, workdir)
  held = held if held is not None else image_sets.load_split(config, split, workdir)
  if config.privacy.heldout_through_vae:
    if sd is None:
      raise MedjaxError("config.privacy.heldout_through_vae needs the generator's VAE")
    held = image_sets.vae_roundtrip(config, sd, held, workdir, mesh)
  probe = None
  if config.privacy.power_probes and sd is not None:
    first = images.parts[0] if isinstance(images, image_store.Chain) else images
    probe = image_sets.vae_roundtrip(config, sd, first.head(config.privacy.power_probes),
                                     workdir, mesh)
  section = run(config, synth, name, images, held, workdir, mesh, params, probe)
  section["heldout_through_vae"] = bool(config.privacy.heldout_through_vae)
  section["notes"] = [f"privacy audit: {n}, so the generated images are compared with the "
                      "evaluation's real train split" for n in notes] + section["notes"]
  if config.privacy.power_probes and sd is None:
    section["notes"].append("privacy audit: its power (privacy.power_probes) is not measured "
                            "without the generator's VAE")
  return section


def run(config: Any, synth, train_name: str, train, held, workdir, mesh=None,
        params=None, probe=None) -> dict:
  """The results.json section of the audit of `synth` (a store of generated images) against
  `train` (the generator's training images, named `train_name`), calibrated on `held` (real
  images it never saw); `probe`: a store of known near-copies of training images, whose flag
  rate is the audit's power. `params`: Inception weights already loaded (else read as for FID
  when `privacy.features='inception'`). `rows(section)` are its results.md rows."""
  p = config.privacy
  opt = check_config(p)
  notes = []
  feature_fn = mem.pixel_feature_fn()
  if p.features == "inception":
    if params is None:
      params, note = inception_params(config)
      notes += [note] if note else []
    feature_fn = mem.inception_feature_fn(params, config.fid.batch_size, mesh, config.fid.resize)
  train, train_keys = unique_rows(train, "train")
  opt = dataclasses.replace(opt, top_k=min(opt.top_k, len(train_keys)))  # a tiny train split
  held, held_keys = unique_rows(held, p.heldout_split)
  names = synth.class_names
  gen_keys = [f"generated/{names[c] if c < len(names) else c}/{i}"
              for i, c in enumerate(synth.labels)]
  start = time.monotonic()
  result = mem.audit(mem.store_batches(synth, gen_keys, p.batch_size),
                     mem.store_batches(held, held_keys, p.batch_size),
                     mem.store_batches(train, train_keys, p.batch_size),
                     mem.store_fetch(train, train_keys), feature_fn, opt, mesh,
                     None if probe is None else mem.store_batches(
                         probe, [f"probe/{i}" for i in range(len(probe))], p.batch_size))
  logging.info("privacy audit: %d generated images vs %d training images (%d held-out) in "
               "%.1f s", len(gen_keys), len(train_keys), len(held_keys),
               time.monotonic() - start)
  figures = {k: v for k, v in FIGURES.items() if k == "histograms" or result["_gallery"]}
  if hosts.is_lead():
    plot_histograms(result, workdir / FIGURES["histograms"])
    save_gallery(result, workdir / FIGURES["gallery"])
  tails = [t for t in (opt.percentile * (1 - opt.ssim_share), opt.percentile * opt.ssim_share)
           if t > 0]
  if result["false_positive_bound"] > opt.percentile / 100 + 1e-12:
    need = math.ceil(100 / min(tails) - 1 - 1e-9)
    notes.append(f"privacy audit: {len(held_keys)} held-out images bound the rule's "
                 f"false-positive rate by {result['false_positive_bound']:.1%} only, above "
                 f"privacy.percentile={opt.percentile:g}%: calibrate on {need}+ held-out "
                 "images")
  return {**mem.public(result), "train_images": train_name, "heldout_split": p.heldout_split,
          "figures": figures, "notes": notes}


def unique_rows(store, name: str):
  """(`store` less the rows whose record key repeats an earlier row's, e.g. an image that two
  generator runs trained on; the kept rows' keys). A store without keys: `name/<row>`."""
  keys = list(getattr(store, "keys", []))
  if len(keys) != len(store):
    return store, [f"{name}/{i}" for i in range(len(store))]
  first = {}
  for i, k in enumerate(keys):
    first.setdefault(k, i)
  if len(first) == len(keys):
    return store, keys
  rows_kept = sorted(first.values())
  return store.subset(np.asarray(rows_kept)), [keys[i] for i in rows_kept]


def calibration(section: dict) -> str:
  """What an audit (its results.json section) was calibrated on, in words."""
  return (f"{section['heldout_split']} split"
          + (", through the generator's VAE" if section.get("heldout_through_vae") else ""))


def rows(section: dict) -> list[list[str]]:
  """The results.md rows of a privacy section: [measure, value]."""
  t = section["thresholds"]
  shown = lambda x: "off" if x is None else fmt(x, 4)
  return [
      ["measure", "value"],
      ["generated / held-out / training images",
       f"{section['num_generated']} / {section['num_heldout']} / {section['num_train']}"],
      ["training images audited against", section["train_images"]],
      ["calibrated on", calibration(section)],
      ["flagged generated images",
       f"{section['flagged']} ({section['fraction_flagged']:.2%})"],
      ["held-out images flagged by the same rule", f"{section['heldout_flag_rate']:.2%}"],
      ["power: VAE round trips of training images flagged by the same rule",
       "not measured" if not section.get("power") else
       f"{section['power']['flagged']} / {section['power']['num_probes']} "
       f"({section['power']['fraction_flagged']:.2%})"],
      ["false-positive bound (budget privacy.percentile)",
       f"{section['false_positive_bound']:.2%} ({t['percentile']:g}%)"],
      ["distance threshold", shown(t["distance"])], ["SSIM threshold", shown(t["ssim"])],
      ["figures", ", ".join(section["figures"].values())],
      ["rule", section["rule"]]]


# -- figures -------------------------------------------------------------------------------------

def plot_histograms(result: dict, path, bins: int = 30, size: tuple[int, int] = (640, 400)):
  """Generated -> train and held-out -> train NN distance histograms (densities) as a PNG, with
  the distance threshold (when that rule is on); PIL only (matplotlib is not a medjax
  dependency), atomic."""
  sets = {"generated -> train": np.asarray(result["distances"]["generated"]),
          "held-out -> train": np.asarray(result["distances"]["heldout"])}
  thr = result["thresholds"]["distance"]
  hi = max(max(v.max() for v in sets.values()), thr or 0.0) * 1.05 or 1.0
  edges = np.linspace(0, hi, bins + 1)
  dens = {n: np.histogram(v, edges)[0] / len(v) for n, v in sets.items()}
  top_v = max(d.max() for d in dens.values()) or 1.0
  w, h = size
  img = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(img)
  left, top, right, bottom = 60, 40, w - 20, h - 50
  to_x = lambda v: left + v / hi * (right - left)
  draw.rectangle([left, top, right, bottom], outline="black")
  for t in np.linspace(0, hi, 5):
    draw.text((to_x(t) - 12, bottom + 5), f"{t:.3g}", fill="black")
  for t in np.linspace(0, top_v, 5):
    draw.text((5, bottom - t / top_v * (bottom - top) - 5), f"{t:.2f}", fill="black")
  colors = [(214, 39, 40), (31, 119, 180)]
  for k, (name, d) in enumerate(dens.items()):
    pts = [(to_x(edges[0]), bottom)]
    for b, v in enumerate(d):
      y = bottom - v / top_v * (bottom - top)
      pts += [(to_x(edges[b]), y), (to_x(edges[b + 1]), y)]
    pts.append((to_x(edges[-1]), bottom))
    draw.line(pts, fill=colors[k], width=2)
    draw.line([(right - 220, top + 10 + 16 * k + 6), (right - 200, top + 10 + 16 * k + 6)],
              fill=colors[k], width=3)
    draw.text((right - 195, top + 10 + 16 * k), f"{name} (n={len(sets[name])})", fill="black")
  if thr is not None:
    draw.line([(to_x(thr), top), (to_x(thr), bottom)], fill=(44, 160, 44), width=1)
    draw.text((to_x(thr) + 3, top + 48), f"threshold {thr:.3g}", fill=(44, 160, 44))
  draw.text(((left + right) / 2 - 110, bottom + 25), "nearest training image: feature distance",
            fill="black")
  draw.text(((left + right) / 2 - 90, 10), "Privacy audit: NN distances", fill="black")
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")


def save_gallery(result: dict, path, cell: int = 96) -> bool:
  """The closest (flagged first) generated / training pairs side by side as one PNG, marked
  synthetic in its metadata. False when there is no pair to draw."""
  rows = result["_gallery"]
  if not rows:
    return False
  label_w, gap = 220, 4
  canvas = Image.new("RGB", (2 * cell + gap + label_w, len(rows) * (cell + gap)), "white")
  draw = ImageDraw.Draw(canvas)
  for r, (pair, gen, match) in enumerate(rows):
    y = r * (cell + gap)
    for c, image in enumerate((gen, match)):
      tile = Image.fromarray(images_lib.to_uint8((np.asarray(image) + 1) / 2))
      canvas.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (c * (cell + gap), y))
    text = (f"{'FLAGGED' if pair['flagged'] else 'not flagged'}\nd={pair['distance']:.4f}"
            f"\nSSIM={pair['ssim']:.3f}{' mirrored' if pair['flipped'] else ''}"
            f"\nshift={tuple(pair['shift'])}\n{pair['generated'][:30]}\n{pair['train'][:30]}")
    draw.multiline_text((2 * cell + 2 * gap, y + 2), text, fill="black", spacing=2)
  images_lib.save_png(np.asarray(canvas), path, {
      "synthetic": "true", "generator": "medjax.eval.memorization",
      "content": "left: generated image; right: its closest training image (a real one)"})
  return True
