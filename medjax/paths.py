"""Workdir paths: local folders and cloud URLs (gs://, s3://, ...) through `etils.epath`.

Orbax reads and writes through epath, so a workdir must stay an epath path end to end: turning
`gs://bucket/run` into a `pathlib.Path` gives the local folder `./gs:/bucket/run`, and on a TPU
pod each worker would then write its own partial checkpoint to its own disk.
"""
import os
import re

from etils import epath

from medjax.errors import MedjaxError

# The URL schemes epath knows (its gs/s3/az/hf backends: TensorFlow's gfile or fsspec).
URL_SCHEMES = ("gs", "s3", "az", "hf")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# What `pathlib.Path("gs://b/run")` makes of a URL: one slash after the scheme.
_COLLAPSED_URL = re.compile(r"^(" + "|".join(URL_SCHEMES) + r"):/(?!/)")


def is_url(path) -> bool:
  """True for `scheme://...` (a cloud path, also as `pathlib` collapsed it), else False."""
  return _URL.match(_COLLAPSED_URL.sub(r"\1://", os.fspath(path))) is not None


def workdir_path(path) -> epath.Path:
  """A workdir or output path as an `epath.Path`: URLs stay URLs, local paths become absolute.

  A URL that `pathlib.Path` already collapsed (`gs:/bucket/run`) is repaired; a URL scheme that
  epath cannot open is a `MedjaxError` rather than a local folder named `memory:`.
  """
  text = _COLLAPSED_URL.sub(r"\1://", os.fspath(path))
  match = _URL.match(text)
  if match:
    if match.group(1) not in URL_SCHEMES:
      raise MedjaxError(f"{text}: unsupported URL scheme {match.group(1)}:// (supported: "
                        + ", ".join(f"{s}://" for s in URL_SCHEMES) + ")")
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))
