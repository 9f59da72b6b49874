"""medjax.eval.ablation: paper A's ablation table and plot from hand-made results dicts."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medjax.errors import MedjaxError
from medjax.eval import ablation


def results(**summary) -> dict:
  """A paper_a results.json's summary_auc: {setting: (mean, std)} with n = 5."""
  return {"protocol": "paper_a",
          "summary_auc": {s: {"mean": m, "std": sd, "n": 5} for s, (m, sd) in summary.items()}}


ROWS = [(64, results(real=(0.780, 0.017), synthetic=(0.766, 0.02))),
        (1, results(real=(0.781, 0.0166), synthetic=(0.61, 0.05))),
        (8, results(real=(0.779, 0.018), synthetic=(0.70, 0.031), **{"real+synthetic": (
            0.803, 0.009)}))]


def test_gather_writes_the_table_and_plot(tmp_path):
  table = ablation.gather(ROWS, "vectors per token", tmp_path)
  assert table == [["vectors per token", "real", "synthetic", "real+synthetic"],
                   ["1", "0.781 ± 0.017", "0.610 ± 0.050", "-"],
                   ["8", "0.779 ± 0.018", "0.700 ± 0.031", "0.803 ± 0.009"],
                   ["64", "0.780 ± 0.017", "0.766 ± 0.020", "-"]]
  md = (tmp_path / "ablation.md").read_text()
  assert "| vectors per token | real | synthetic | real+synthetic |" in md
  assert "| 8 | 0.779 ± 0.018 | 0.700 ± 0.031 | 0.803 ± 0.009 |" in md
  with Image.open(tmp_path / "ablation.png") as img:
    assert img.format == "PNG" and img.size == (640, 480)
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
  for color in ablation.COLORS[:3]:  # a line per training set
    assert (pixels == color).all(-1).sum() > 50, color
  assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_log_axis_when_values_span_more_than_10x(tmp_path):
  """1, 8, 64 on a log axis are evenly spaced: the middle point sits midway."""
  ablation.gather(ROWS, "vectors", tmp_path / "log")
  ablation.gather([(10, ROWS[0][1]), (50, ROWS[1][1]), (100, ROWS[2][1])], "images",
                  tmp_path / "lin")
  def marker_columns(path):
    rgb = np.asarray(Image.open(path).convert("RGB"))
    cols = np.nonzero((rgb == ablation.COLORS[0]).all(-1).sum(0) >= 6)[0]  # error bars, dots
    groups = np.split(cols, np.nonzero(np.diff(cols) > 3)[0] + 1)
    return [g.mean() for g in groups]
  a, b, c = marker_columns(tmp_path / "log" / "ablation.png")
  assert abs((b - a) - (c - b)) < 3  # log10: 0, 0.9, 1.8
  a, b, c = marker_columns(tmp_path / "lin" / "ablation.png")
  assert abs((b - a) / (c - a) - 40 / 90) < 0.02  # linear: 10, 50, 100


def test_gather_refuses_bad_input(tmp_path):
  with pytest.raises(MedjaxError, match="value 8 have no summary_auc"):
    ablation.gather([(1, ROWS[0][1]), (8, {"protocol": "paper_b"})], "v", tmp_path)
  with pytest.raises(MedjaxError, match=r"a value of 'v' repeats in \[1, 1\]"):
    ablation.gather([(1, ROWS[0][1]), ("1", ROWS[1][1])], "v", tmp_path)
  with pytest.raises(MedjaxError, match="'many' is not a number"):
    ablation.gather([("many", ROWS[0][1])], "v", tmp_path)
  nan = results(real=(float("nan"), 0.1))
  with pytest.raises(MedjaxError, match="no summary_auc"):
    ablation.gather([(1, nan)], "v", tmp_path)
  assert not list(tmp_path.iterdir())


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "medjax.eval.ablation", *args],
                        capture_output=True, text=True, timeout=300, check=False)


def test_cli_reads_results_json_and_names_a_missing_one(tmp_path):
  for value, summary in ROWS:
    (tmp_path / f"v{value}").mkdir()
    (tmp_path / f"v{value}" / "results.json").write_text(json.dumps(summary))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "results.json").write_text("{not json")
  run = _cli(f"--workdirs={tmp_path}/v1,{tmp_path}/v64", "--values=1,64", "--swept=vectors",
             f"--outdir={tmp_path}/out")
  assert run.returncode == 0, run.stderr
  assert "| 64 | 0.780 ± 0.017 | 0.766 ± 0.020 |" in run.stdout
  assert (tmp_path / "out" / "ablation.png").exists()
  assert ablation.read_results(tmp_path / "v8")["summary_auc"]["real+synthetic"]["n"] == 5
  with pytest.raises(MedjaxError, match=r"bad/results.json: not valid JSON"):
    ablation.read_results(tmp_path / "bad")
  run = _cli(f"--workdirs={tmp_path}/v1,{tmp_path}/none", "--values=1,8", "--swept=v",
             f"--outdir={tmp_path}/out2")
  assert run.returncode == 1
  assert run.stderr.strip() == (f"error: --workdirs: {tmp_path}/none/results.json: no such "
                                "file (run medjax.evaluate there first)")
  assert not (tmp_path / "out2").exists()
