"""Without pydicom / nibabel / SimpleITK a medical file is one MedjaxError naming what to install
(simulated: `sys.modules[name] = None` makes `import name` fail as if it were not installed)."""
import sys

import pytest

from data_testlib import PICAI_SMALL
from medjax.data import load_picai
from medjax.data import make_phantoms
from medjax.data import optional
from medjax.data import read_image
from medjax.errors import MedjaxError

INSTALL = r"which is not installed: pip install 'medjax\[io\]'"


def _missing(monkeypatch, *names):
  for name in names:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
      monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("file_name,package", [
    ("scan.dcm", "pydicom"), ("scan.nii.gz", "nibabel"), ("scan.mha", "SimpleITK")])
def test_reading_a_medical_file_without_its_package(tmp_path, monkeypatch, file_name, package):
  path = tmp_path / file_name
  path.write_bytes(b"not read: the package is missing")
  _missing(monkeypatch, package)
  with pytest.raises(MedjaxError, match=rf"{file_name}: reading .* needs {package}, {INSTALL}"):
    read_image(path)


def test_picai_and_phantom_volumes_without_simpleitk(picai_root, tmp_path, monkeypatch):
  _missing(monkeypatch, "SimpleITK")
  with pytest.raises(MedjaxError, match=rf"PI-CAI: .* needs SimpleITK, {INSTALL}"):
    load_picai(picai_root, **PICAI_SMALL)
  with pytest.raises(MedjaxError, match=rf"a phantom MRI volume needs SimpleITK, {INSTALL}"):
    make_phantoms.write_picai_phantoms(str(tmp_path / "picai"), 1, size=32, slices=4)


def test_require_returns_the_module_and_names_a_broken_one(tmp_path, monkeypatch):
  import numpy.linalg  # pylint: disable=g-import-not-at-top
  assert optional.require("numpy.linalg", "x") is numpy.linalg
  monkeypatch.setitem(sys.modules, "fakeio", None)
  with pytest.raises(MedjaxError, match=f"y needs fakeio, {INSTALL}"):
    optional.require("fakeio.sub", "y")
  # Installed, but its own dependency is missing: say so instead of "not installed".
  (tmp_path / "brokenio").mkdir()
  (tmp_path / "brokenio" / "__init__.py").write_text("import no_such_dependency_of_brokenio\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(MedjaxError, match="z needs brokenio, which failed to import .*"
                     "no_such_dependency_of_brokenio"):
    optional.require("brokenio", "z")
