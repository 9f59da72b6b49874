"""Phantoms and the make_phantoms writer, loaded back through the real loaders."""
import subprocess
import sys

import numpy as np
import pytest

from data_testlib import PICAI_SMALL
from medjax.data import default_config, load_chexpert, load_picai, make_dataset, make_phantoms
from medjax.data import phantoms


def test_chest_xray_deterministic_any_size():
  a = phantoms.chest_xray(48, seed=1)
  np.testing.assert_array_equal(a, phantoms.chest_xray(48, seed=1))
  assert not np.array_equal(a, phantoms.chest_xray(48, seed=2))
  assert phantoms.chest_xray((40, 56), seed=1).shape == (40, 56)
  assert a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
  with pytest.raises(ValueError, match="too small"):
    phantoms.chest_xray(4, seed=0)


def test_effusion_is_a_basal_opacity_with_meniscus():
  size = 64
  clear = phantoms.chest_xray(size, seed=3)
  effusion = phantoms.chest_xray(size, seed=3, effusion=True, effusion_side="right")
  difference = effusion - clear
  changed = difference > 0.1
  rows, cols = np.nonzero(changed)
  assert changed.sum() > 20
  assert rows.mean() > size * 0.55  # lower chest
  assert cols.mean() < size / 2  # patient's right = image left
  # Meniscus: the opacity reaches higher at the lateral chest wall than medially.
  top_by_col = {c: rows[cols == c].min() for c in set(cols)}
  lateral, medial = min(top_by_col), max(top_by_col)
  assert top_by_col[lateral + 1] < top_by_col[medial]


def test_cardiomegaly_widens_the_heart():
  def heart_width(image):
    row = image[int(image.shape[0] * 0.62)]
    return (row > 0.5).sum()
  normal = phantoms.chest_xray(96, seed=4)
  enlarged = phantoms.chest_xray(96, seed=4, cardiomegaly=True)
  assert heart_width(enlarged) > heart_width(normal) + 5


def test_make_phantoms_cxr_loads_through_chexpert(tmp_path):
  subprocess.run([sys.executable, "-m", "medjax.data.make_phantoms", "--kind=cxr", "--num=24",
                  f"--out={tmp_path}", "--size=32", "--seed=1"], check=True)
  index = load_chexpert(tmp_path / make_phantoms.CHEXPERT_DIR)
  assert len(index.records) == 24
  assert {r.source_split for r in index.records} <= {"train", "val"}
  assert any(r.labels["Pleural Effusion"] == 1.0 for r in index.records)
  assert load_chexpert(tmp_path).records == index.records  # the parent works as root too
  # End to end through the pipeline with paper-A classes and class prompts.
  config = default_config()
  config.source, config.root = "chexpert", str(tmp_path / make_phantoms.CHEXPERT_DIR)
  config.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                    ("no_finding", {"No Finding": 1}))
  config.prompt.kind = "class"
  config.split.fractions = (1.0, 0.0, 0.0)
  batch = next(make_dataset(config, "train", 4, seed=0, resolution=32, process_index=0,
                            process_count=1))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert set(batch["prompt"]) <= {"a chest x-ray with pleural effusion", "no finding"}


def test_make_phantoms_mri_loads_through_picai(picai_root):
  index = load_picai(picai_root, **PICAI_SMALL)
  assert len(index.records) == 4 * 12
  config = default_config()
  config.source, config.root = "picai", str(picai_root)
  config.picai.spacing, config.picai.crop = PICAI_SMALL["spacing"], PICAI_SMALL["crop"]
  config.classes = (("diseased", {"csPCa": 1}), ("healthy", {"csPCa": 0}))
  config.split.fractions = (1.0, 0.0, 0.0)
  config.prompt.kind = "class"
  batch = next(make_dataset(config, "train", 6, seed=0, resolution=32, process_index=0,
                            process_count=1))
  assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].min() >= -1.0
  assert set(batch["prompt"]) <= {"a prostate mri with diseased", "a prostate mri with healthy"}
