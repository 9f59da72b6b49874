"""PI-CAI loader on phantom studies written in the real layout with SimpleITK."""
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from data_testlib import PICAI_SEED, PICAI_SMALL
from medjax.data import load_picai, phantoms, picai
from medjax.errors import MedjaxError


@pytest.fixture
def picai_copy(picai_root, tmp_path):
  return shutil.copytree(picai_root, tmp_path / "picai")


def studies(index):
  out = {}
  for record in index.records:
    out.setdefault(record.get("study"), []).append(record)
  return out


def test_slices_labels_follow_the_mask(picai_root):
  index = load_picai(picai_root, **PICAI_SMALL)
  assert index.label_names == ("csPCa",)
  by_study = studies(index)
  assert len(by_study) == 4 and all(len(v) == 12 for v in by_study.values())
  masks = picai._find_masks(str(picai_root), "")
  for study, records in by_study.items():
    mask = sitk.GetArrayFromImage(sitk.ReadImage(masks[tuple(study.split("_"))]))
    # The small protocol keeps the T2W's 12 x 3.6 mm slices, so slice k is mask slice k.
    expected = [float(mask[k].any()) for k in range(12)]
    assert [r.labels["csPCa"] for r in sorted(records, key=lambda r: r.key)] == expected
  assert any(r.labels["csPCa"] == 1.0 for r in index.records)
  assert any(r.labels["csPCa"] == 0.0 for r in index.records)


def _slice_points(record, k):
  grid = picai.output_grid(picai._read_header(record.path), record.get("protocol"))
  x, y = (grid.origin[i] + np.arange(int(grid.size[i])) * grid.spacing[i] for i in (0, 1))
  yy, xx = np.meshgrid(y, x, indexing="ij")
  return np.full_like(yy, grid.origin[2] + k * grid.spacing[2]), yy, xx


def test_lesion_dark_on_adc_bright_on_hbv(picai_root):
  index = load_picai(picai_root, **PICAI_SMALL)
  positive = [r for r in index.records if r.get("case_csPCa") == "YES"]
  assert positive
  study = studies(index)[positive[0].get("study")]
  mask = sitk.ReadImage(study[0].get("mask"))
  grid = picai.output_grid(picai._read_header(study[0].path), study[0].get("protocol"))
  masks = picai._resample(mask, grid, nearest=True, default=0) > 0
  k = int(masks.sum(axis=(1, 2)).argmax())
  record = study[k]
  assert record.labels["csPCa"] == 1.0
  image = picai.load_slice(record)
  assert image.shape == (48, 48, 3) and image.dtype == np.float32
  assert 0.0 <= image.min() and image.max() <= 1.0
  seed = PICAI_SEED * 1_000_003 + int(record.get("study").split("_")[1]) - 1000000
  healthy = phantoms.prostate_mri_sample(*_slice_points(record, k), seed=seed, lesion=False)
  gland = (healthy["adc"] > 0.45) & (healthy["adc"] < 0.8) & ~masks[k]
  lesion = masks[k]
  assert image[..., 1][lesion].mean() < 0.7 * image[..., 1][gland].mean()
  assert image[..., 2][lesion].mean() > 2.0 * image[..., 2][gland].mean()


def test_channels_resampled_onto_t2w_frame(picai_root):
  """ADC/HBV are written on a coarser, shifted grid. After processing, every channel must match
  the phantom evaluated analytically at the output voxels' physical positions."""
  index = load_picai(picai_root, **PICAI_SMALL)
  record = studies(index)["10000_1000000"][6]
  volume = picai.process_study({"t2w": record.path, "adc": record.get("adc"),
                                "hbv": record.get("hbv")}, record.get("protocol"))
  truth = phantoms.prostate_mri_sample(*_slice_points(record, 6), seed=PICAI_SEED * 1_000_003,
                                       lesion=record.get("case_csPCa") == "YES")
  for channel, name in enumerate(("t2w", "adc", "hbv")):
    correlation = np.corrcoef(volume[6, :, :, channel].ravel(), truth[name].ravel())[0, 1]
    assert correlation > 0.9, (name, correlation)


def test_default_protocol_grid():
  header = picai._Grid(np.zeros(3), np.array([0.4, 0.4, 3.6]), np.eye(3), np.array([384, 384, 25]))
  grid = picai.output_grid(header, picai.Protocol())
  assert list(grid.size) == [300, 300, 30] and list(grid.spacing) == [0.5, 0.5, 3.0]
  # Resampled size 307 x 307 x 30: the crop starts 3 voxels in.
  np.testing.assert_allclose(grid.origin, [1.5, 1.5, 0.0])


def test_mismatched_orientation(picai_copy):
  path = os.path.join(picai_copy, "images/10001/10001_1000001_adc.mha")
  image = sitk.ReadImage(path)
  image.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))  # coronal instead of axial
  sitk.WriteImage(image, path)
  with pytest.raises(MedjaxError, match=r"10001_1000001_adc.mha: orientation differs from "
                     r"10001_1000001_t2w.mha by 90.0 degrees"):
    load_picai(picai_copy, **PICAI_SMALL)
  index = load_picai(picai_copy, on_bad_file="skip", **PICAI_SMALL)
  assert len(studies(index)) == 3 and "orientation" in index.skipped[0]


def test_missing_series(picai_copy):
  os.remove(os.path.join(picai_copy, "images/10000/10000_1000000_hbv.mha"))
  with pytest.raises(MedjaxError, match=r"study 10000_1000000 lacks hbv series"):
    load_picai(picai_copy, **PICAI_SMALL)
  index = load_picai(picai_copy, on_bad_file="skip", **PICAI_SMALL)
  assert "10000_1000000" not in studies(index) and len(studies(index)) == 3


def test_missing_masks(picai_copy):
  masks = os.path.join(picai_copy, "picai_labels/csPCa_lesion_delineations/human_expert/resampled")
  marksheet = open(os.path.join(picai_copy, "picai_labels/clinical_information/marksheet.csv")
                   ).read()
  positive = [line.split(",")[:2] for line in marksheet.splitlines()[1:] if line.endswith("YES")]
  negative = [line.split(",")[:2] for line in marksheet.splitlines()[1:] if line.endswith("NO")]
  for patient, study in positive[:1] + negative[:1]:
    os.remove(os.path.join(masks, f"{patient}_{study}.nii.gz"))
  with pytest.raises(MedjaxError, match="is csPCa-positive in the marksheet"):
    load_picai(picai_copy, **PICAI_SMALL)
  index = load_picai(picai_copy, on_bad_file="skip", **PICAI_SMALL)
  by_study = studies(index)
  assert "_".join(positive[0]) not in by_study
  assert all(r.labels["csPCa"] == 0.0 for r in by_study["_".join(negative[0])])


def test_non_overlapping_series(picai_copy):
  path = os.path.join(picai_copy, "images/10002/10002_1000002_hbv.mha")
  image = sitk.ReadImage(path)
  image.SetOrigin([v + 500.0 for v in image.GetOrigin()])
  sitk.WriteImage(image, path)
  index = load_picai(picai_copy, **PICAI_SMALL)
  record = studies(index)["10002_1000002"][0]
  with pytest.raises(MedjaxError, match=r"10002_1000002_hbv.mha: covers only 0% of the T2W"):
    picai.load_slice(record)


def test_missing_root_and_empty(tmp_path):
  with pytest.raises(MedjaxError, match="PI-CAI root directory does not exist"):
    load_picai(tmp_path / "nope")
  with pytest.raises(MedjaxError, match="no PI-CAI studies"):
    load_picai(tmp_path)


def test_prostate_phantom_channels():
  image = phantoms.prostate_mri(64, seed=3, lesion=True)
  healthy = phantoms.prostate_mri(64, seed=3, lesion=False)
  assert image.shape == (64, 64, 3) and image.dtype == np.float32
  changed = np.abs(image - healthy).sum(-1) > 0.3
  assert changed.any()
  assert (image[..., 1][changed] < healthy[..., 1][changed]).mean() > 0.9  # ADC darker
  assert (image[..., 2][changed] > healthy[..., 2][changed]).mean() > 0.9  # HBV brighter
