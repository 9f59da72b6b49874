"""Paper A's ablations as one table and one plot: test AUC of each training set vs a swept value.

Paper A swept vectors per token (1, 8, 16, 64) and images per class (10, 50, 100): each value is
a training run and then an evaluation (`protocols.paper_a`, whose results.json holds
`summary_auc` = {training set: {mean, std, n}}). `gather` puts the evaluations side by side:
ablation.md (one row per value, one column per training set, mean ± std) and ablation.png (AUC
vs the value, one line per training set, error bars = std; a log x axis when the values span
more than 10x), both written atomically.

  python -m medjax.eval.ablation --workdirs=/runs/v1,/runs/v8,/runs/v16,/runs/v64 \
      --values=1,8,16,64 --swept='vectors per token' --outdir=/runs/ablation_vectors
"""
import json
import math
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image
from PIL import ImageDraw

from medjax import atomic
from medjax import cli
from medjax import paths
from medjax.errors import MedjaxError

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75)]


def gather(rows: Sequence[tuple[float, dict]], swept: str, outdir) -> list[list[str]]:
  """(swept value, paper A results dict) pairs -> ablation.md and ablation.png in `outdir`;
  returns the table ([header, *rows] of strings), rows in increasing value."""
  if not rows:
    raise MedjaxError("ablation: no results given")
  points = sorted(((_number(v), _summary(r, v)) for v, r in rows), key=lambda p: p[0])
  values = [v for v, _ in points]
  if len(set(values)) != len(values):
    raise MedjaxError(f"ablation: a value of {swept!r} repeats in {values}")
  settings = list(dict.fromkeys(s for _, summary in points for s in summary))
  table = [[swept, *settings]]
  for value, summary in points:
    table.append([fmt(value)] + [f"{summary[s]['mean']:.3f} ± {summary[s]['std']:.3f}"
                                 if s in summary else "-" for s in settings])
  outdir = paths.workdir_path(outdir)
  n = sorted({summary[s]["n"] for _, summary in points for s in summary})
  lines = [f"# Ablation: test AUC vs {swept}", "",
           f"Each cell: AUC mean ± std over {'/'.join(map(str, n))} repeat(s).", "",
           "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
  lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
  atomic.write_text(outdir / "ablation.md", "\n".join(lines) + "\n")
  plot(points, settings, swept, outdir / "ablation.png")
  return table


def fmt(value: float) -> str:
  return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _number(value) -> int | float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise MedjaxError(f"ablation: swept value {value!r} is not a number") from None
  if not math.isfinite(number):
    raise MedjaxError(f"ablation: swept value {value!r} is not finite")
  return int(number) if number.is_integer() else number


def _summary(results, value) -> dict:
  """results['summary_auc'], checked: {setting: {'mean', 'std', 'n'}} with finite numbers."""
  summary = results.get("summary_auc") if isinstance(results, dict) else None
  ok = isinstance(summary, dict) and summary and all(
      isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) and math.isfinite(s[k])
                                  for k in ("mean", "std", "n")) for s in summary.values())
  if not ok:
    raise MedjaxError(f"ablation: the results for value {value!r} have no summary_auc "
                      "{setting: {mean, std, n}} (a paper_a results.json is expected)")
  return summary


def plot(points, settings: list[str], swept: str, path, size: tuple[int, int] = (640, 480)):
  """AUC vs value as a PNG (PIL drawing; matplotlib is not a medjax dependency), atomically."""
  width, height = size
  img = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(img)
  left, top, right, bottom = 70, 40, width - 20, height - 60
  values = np.array([v for v, _ in points], np.float64)
  log = values.min() > 0 and values.max() > 10 * values.min()
  xs = np.log10(values) if log else values
  x0, x1 = (xs.min() - 0.5, xs.max() + 0.5) if xs.min() == xs.max() else (xs.min(), xs.max())
  pad = 0.06 * (x1 - x0)
  x0, x1 = x0 - pad, x1 + pad
  lows = [s["mean"] - s["std"] for _, summary in points for s in summary.values()]
  highs = [s["mean"] + s["std"] for _, summary in points for s in summary.values()]
  y0, y1 = max(0.0, min(lows) - 0.02), min(1.0, max(highs) + 0.02)
  if y1 - y0 < 0.05:
    y0, y1 = max(0.0, (y0 + y1) / 2 - 0.025), min(1.0, (y0 + y1) / 2 + 0.025)
  to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (right - left),
                        bottom - (y - y0) / (y1 - y0) * (bottom - top))
  draw.rectangle([left, top, right, bottom], outline="black")
  for i in range(5):  # y grid and ticks
    y = y0 + i * (y1 - y0) / 4
    _, py = to_px(x0, y)
    draw.line([(left, py), (right, py)], fill=(225, 225, 225))
    draw.text((left - 40, py - 5), f"{y:.3f}", fill="black")
  for v, x in zip(values, xs, strict=True):  # an x tick at every swept value
    px, _ = to_px(x, y0)
    draw.line([(px, bottom), (px, bottom + 4)], fill="black")
    draw.text((px - 8, bottom + 8), fmt(_number(v)), fill="black")
  draw.text(((left + right) / 2 - 60, bottom + 28), swept + (" (log scale)" if log else ""),
            fill="black")
  draw.text((5, top - 25), "test AUC (mean ± std)", fill="black")
  for k, setting in enumerate(settings):
    color = COLORS[k % len(COLORS)]
    line = []
    for x, (_, summary) in zip(xs, points, strict=True):
      if setting not in summary:
        continue
      m, s = summary[setting]["mean"], summary[setting]["std"]
      px, py = to_px(x, m)
      (_, lo), (_, hi) = to_px(x, m - s), to_px(x, m + s)
      draw.line([(px, lo), (px, hi)], fill=color, width=1)  # error bar with caps
      draw.line([(px - 4, lo), (px + 4, lo)], fill=color)
      draw.line([(px - 4, hi), (px + 4, hi)], fill=color)
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
      line.append((px, py))
    if len(line) > 1:
      draw.line(line, fill=color, width=2)
    ly = top + 8 + 16 * k
    draw.line([(left + 10, ly + 6), (left + 30, ly + 6)], fill=color, width=3)
    draw.text((left + 35, ly), setting, fill="black")
  with atomic.atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return path


def read_results(workdir) -> dict:
  """A workdir's results.json; one error line when it is missing or not a paper_a result."""
  path = paths.workdir_path(workdir) / "results.json"
  try:
    results = json.loads(path.read_text())
  except FileNotFoundError:
    raise MedjaxError(f"--workdirs: {path}: no such file (run medjax.evaluate there "
                      "first)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MedjaxError(f"--workdirs: {path}: not valid JSON ({e})") from None
  try:
    _summary(results, workdir)
  except MedjaxError:
    raise MedjaxError(f"--workdirs: {path}: no summary_auc {{setting: {{mean, std, n}}}} (not a "
                      "paper_a results.json)") from None
  return results


def define_flags():
  flags.DEFINE_list("workdirs", None, "Evaluation workdirs (paper_a results.json), one per value.")
  flags.DEFINE_list("values", None, "The swept value of each workdir, in the same order.")
  flags.DEFINE_string("swept", None, "What was swept, e.g. 'vectors per token'.")
  flags.DEFINE_string("outdir", None, "Where ablation.md and ablation.png go.")
  flags.mark_flags_as_required(["workdirs", "values", "swept", "outdir"])


def main(argv):
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if len(f.workdirs) != len(f.values):
    raise MedjaxError(f"--workdirs has {len(f.workdirs)} entries but --values has "
                      f"{len(f.values)}: give one value per workdir")
  values = []
  for v in f.values:
    try:
      values.append(_number(v))
    except MedjaxError:
      raise MedjaxError(f"--values: {v!r} is not a number") from None
  table = gather([(v, read_results(w)) for v, w in zip(values, f.workdirs, strict=True)],
                 f.swept, f.outdir)
  print("\n".join("| " + " | ".join(r) + " |" for r in table))


if __name__ == "__main__":
  cli.run(main, define_flags)
