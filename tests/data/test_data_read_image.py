"""read_image / read_volume on real sample files (pydicom, nibabel) and files written here."""
import os
import shutil

import nibabel as nib
import nibabel.testing
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file

from medjax.data import read_image, read_volume
from medjax.errors import MedjaxError


def dicom_sample(name):
  path = get_testdata_file(name)
  if path is None:
    pytest.skip(f"pydicom sample {name} not available")
  return path


# ------------------------------------------------------------------------------ PNG / JPEG


def test_png_8bit_values(tmp_path):
  pixels = np.array([[0, 51], [204, 255]], np.uint8)
  Image.fromarray(pixels).save(tmp_path / "a.png")
  image = read_image(tmp_path / "a.png")
  assert image.dtype == np.float32 and image.shape == (2, 2)
  np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)


def test_png_16bit_values(tmp_path):
  pixels = np.array([[0, 1000], [32768, 65535]], np.uint16)
  Image.fromarray(pixels).save(tmp_path / "a.png")
  np.testing.assert_allclose(read_image(tmp_path / "a.png"), pixels / 65535.0, atol=1e-7)


def test_rgb_png_and_jpeg(tmp_path):
  pixels = np.zeros((16, 16, 3), np.uint8)
  pixels[..., 0] = 255
  Image.fromarray(pixels).save(tmp_path / "a.png")
  Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
  png, jpg = read_image(tmp_path / "a.png"), read_image(tmp_path / "a.jpg")
  assert png.shape == jpg.shape == (16, 16, 3)
  np.testing.assert_allclose(png[..., 0], 1.0)
  np.testing.assert_allclose(jpg, png, atol=0.03)


def test_truncated_png_names_file(tmp_path):
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
      tmp_path / "a.png")
  data = (tmp_path / "a.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(MedjaxError, match=r"cut\.png.*(truncated|corrupt)"):
    read_image(tmp_path / "cut.png")


def test_missing_and_unsupported_files(tmp_path):
  with pytest.raises(MedjaxError, match="nope.png: file not found"):
    read_image(tmp_path / "nope.png")
  (tmp_path / "notes.xyz").write_text("hello")
  with pytest.raises(MedjaxError, match="notes.xyz: unsupported"):
    read_image(tmp_path / "notes.xyz")


# ------------------------------------------------------------------------------ DICOM


def _window(values, center, width):
  return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def test_dicom_rescale_without_window_is_min_max():
  path = dicom_sample("CT_small.dcm")  # RescaleSlope 1, Intercept -1024, no window
  ds = pydicom.dcmread(path)
  hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  image = read_image(path)
  np.testing.assert_allclose(image, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_dicom_window_from_file_and_override():
  path = dicom_sample("MR_small.dcm")
  ds = pydicom.dcmread(path)
  values = ds.pixel_array.astype(np.float64)
  center, width = float(ds.WindowCenter), float(ds.WindowWidth)
  np.testing.assert_allclose(read_image(path), _window(values, center, width), atol=1e-6)
  np.testing.assert_allclose(read_image(path, window=(500, 200)), _window(values, 500, 200),
                             atol=1e-6)


def test_ct_window_in_hounsfield():
  path = dicom_sample("CT_small.dcm")
  ds = pydicom.dcmread(path)
  hu = ds.pixel_array * 1.0 - 1024.0
  np.testing.assert_allclose(read_image(path, window=(40, 400)), _window(hu, 40, 400), atol=1e-6)


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
  source = dicom_sample("MR_small.dcm")
  ds = pydicom.dcmread(source)
  ds.PhotometricInterpretation = "MONOCHROME1"
  ds.save_as(tmp_path / "mono1.dcm")
  normal, inverted = read_image(source), read_image(tmp_path / "mono1.dcm")
  np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)


def test_voi_lut_sequence(tmp_path):
  ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
  lut = pydicom.Dataset()
  lut.LUTDescriptor = [4096, 0, 12]
  table = np.minimum(np.arange(4096) * 2, 4095).astype("<u2")  # doubles, saturates at 4095
  lut.add_new(0x00283006, "OW", table.tobytes())
  ds.VOILUTSequence = [lut]
  del ds.WindowCenter, ds.WindowWidth
  ds.save_as(tmp_path / "lut.dcm")
  expected = table[np.clip(ds.pixel_array, 0, 4095)] / 4095.0
  np.testing.assert_allclose(read_image(tmp_path / "lut.dcm"), expected, atol=1e-6)


def test_multiframe_dicom_needs_a_frame():
  path = dicom_sample("rtdose.dcm")  # 15 frames
  volume = read_volume(path)
  assert volume.shape == (15, 10, 10) and 0.0 <= volume.min() and volume.max() <= 1.0
  np.testing.assert_array_equal(read_image(path, frame=3), volume[3])
  with pytest.raises(MedjaxError, match="rtdose.dcm: contains 15 frames"):
    read_image(path)


def test_rgb_dicom():
  path = dicom_sample("examples_rgb_color.dcm")
  image = read_image(path)
  np.testing.assert_allclose(image, pydicom.dcmread(path).pixel_array / 255.0, atol=1e-6)
  assert image.ndim == 3 and image.shape[-1] == 3 and image.max() <= 1.0


def test_compressed_dicom_decodes_or_names_missing_handler():
  np.testing.assert_allclose(read_image(dicom_sample("MR_small_RLE.dcm")),
                             read_image(dicom_sample("MR_small.dcm")), atol=1e-6)
  path = dicom_sample("MR_small_jpeg_ls_lossless.dcm")
  try:
    image = read_image(path)
  except MedjaxError as e:
    assert "JPEG-LS" in str(e) and "handler" in str(e) and "MR_small_jpeg_ls_lossless" in str(e)
  else:
    np.testing.assert_allclose(image, read_image(dicom_sample("MR_small.dcm")), atol=1e-6)


def test_dicom_without_pixel_data():
  with pytest.raises(MedjaxError, match="rtplan.dcm: DICOM file has no pixel data"):
    read_image(dicom_sample("rtplan.dcm"))


def test_truncated_dicom_pixel_data():
  with pytest.raises(MedjaxError, match="MR_truncated.dcm"):
    read_image(dicom_sample("MR_truncated.dcm"))


def test_errors_never_carry_patient_identifiers(tmp_path):
  ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
  ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET123"
  del ds.PixelData
  ds.save_as(tmp_path / "x.dcm")
  with pytest.raises(MedjaxError) as info:
    read_image(tmp_path / "x.dcm")
  assert "Doe" not in str(info.value) and "SECRET123" not in str(info.value)


def test_extensionless_dicom(tmp_path):
  shutil.copy(dicom_sample("MR_small.dcm"), tmp_path / "IM0001")
  np.testing.assert_allclose(read_image(tmp_path / "IM0001"),
                             read_image(dicom_sample("MR_small.dcm")))


# ------------------------------------------------------------------------------ NIfTI / ITK


def test_nifti_sample_volume_and_4d_error():
  anatomical = os.path.join(nibabel.testing.data_path, "anatomical.nii")
  volume = read_volume(anatomical)
  data = nib.load(anatomical).get_fdata()
  assert volume.shape[0] == data.shape[2] and volume.min() == 0.0 and volume.max() == 1.0
  with pytest.raises(MedjaxError, match="anatomical.nii: contains"):
    read_image(anatomical)
  assert read_image(anatomical, frame=5).shape == volume.shape[1:]
  with pytest.raises(MedjaxError, match=r"example4d.nii.gz: NIfTI image has 4 dimensions"):
    read_image(os.path.join(nibabel.testing.data_path, "example4d.nii.gz"))


def test_nifti_and_mha_agree(tmp_path):
  values = np.random.default_rng(0).random((5, 12, 10)).astype(np.float32)  # z, y, x
  image = sitk.GetImageFromArray(values)
  image.SetSpacing((0.7, 0.8, 3.0))
  for name in ("v.mha", "v.nii.gz", "v.nrrd"):
    sitk.WriteImage(image, str(tmp_path / name))
  mha = read_volume(tmp_path / "v.mha")
  np.testing.assert_allclose(mha, (values - values.min()) / (values.max() - values.min()),
                             atol=1e-6)
  np.testing.assert_allclose(read_volume(tmp_path / "v.nii.gz"), mha, atol=1e-6)
  np.testing.assert_allclose(read_image(tmp_path / "v.nrrd", frame=2), mha[2], atol=1e-6)


def test_2d_nifti(tmp_path):
  values = np.arange(12, dtype=np.float32).reshape(4, 3)
  nib.save(nib.Nifti1Image(values, np.eye(4)), tmp_path / "a.nii.gz")
  image = read_image(tmp_path / "a.nii.gz")
  assert image.shape == (3, 4) and image.min() == 0.0 and image.max() == 1.0


def test_identifiers_are_never_parsed_or_logged(tmp_path, caplog):
  ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
  ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "SECRET123", "19700101"
  ds.save_as(tmp_path / "x.dcm")
  with caplog.at_level("DEBUG"):
    read_image(tmp_path / "x.dcm")
  assert "Doe" not in caplog.text and "SECRET123" not in caplog.text


def test_enhanced_shared_functional_group_rescale(tmp_path):
  ds = pydicom.dcmread(dicom_sample("MR_small.dcm"))
  del ds.WindowCenter, ds.WindowWidth
  transform, voi, group = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
  transform.RescaleSlope, transform.RescaleIntercept = 2.0, -100.0
  voi.WindowCenter, voi.WindowWidth = 1000.0, 1500.0
  group.PixelValueTransformationSequence = [transform]
  group.FrameVOILUTSequence = [voi]
  ds.SharedFunctionalGroupsSequence = [group]
  ds.save_as(tmp_path / "enhanced.dcm")
  values = ds.pixel_array * 2.0 - 100.0
  np.testing.assert_allclose(read_image(tmp_path / "enhanced.dcm"), _window(values, 1000, 1500),
                             atol=1e-6)
