"""The optional medical-image IO packages (pydicom, nibabel, SimpleITK), imported when a file
needs one: a missing package is one MedjaxError saying what to install, not an ImportError."""
import importlib
import types

from medjax.errors import MedjaxError

INSTALL = "pip install 'medjax[io]'"  # the `io` extra of setup.py brings all three


def require(module_name: str, what: str) -> types.ModuleType:
  """The module `module_name` (e.g. 'pydicom.pixels'), imported.

  Args:
    module_name: a module of pydicom, nibabel or SimpleITK.
    what: what needs it, for the message, e.g. 'x.dcm: reading a DICOM file'.

  Raises:
    MedjaxError naming `what`, the missing package and the pip command that installs it.
  """
  package = module_name.split(".")[0]
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if (e.name or package).split(".")[0] != package:
      raise MedjaxError(f"{what} needs {package}, which failed to import ({e})") from None
    raise MedjaxError(f"{what} needs {package}, which is not installed: {INSTALL}") from None
