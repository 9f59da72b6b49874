"""Metric writers: TensorBoard event files plus log lines, with clu's `MetricWriter` methods.

clu's default writer is used when TensorFlow is installed (`clu.metric_writers` imports it);
otherwise the same interface is served by tensorboardX, so TensorBoard works without TF.
Only process 0 writes files; the others just log.
"""
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from medjax import atomic
from medjax import paths


class TensorboardXWriter:
  """clu-style writer (write_scalars/write_images/write_hparams/flush/close) over tensorboardX."""

  def __init__(self, logdir, *, log: bool = True):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._tb = tensorboardX.SummaryWriter(str(logdir))
    self._log = log
    self._jsonl = paths.workdir_path(logdir) / "metrics.jsonl"

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    try:
      with self._jsonl.open("a") as f:
        f.write(json.dumps({"step": int(step), **values}) + "\n")
    except OSError as e:  # (a full disk: the run stops here, the error names the file)
      raise atomic.named(e, self._jsonl) from e
    if self._log:
      logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for k, v in images.items():
      v = np.asarray(v)
      self._tb.add_image(k, v if v.ndim == 3 else v[0], step, dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._tb.add_text("hparams", json.dumps(dict(hparams), indent=1, default=str), 0)

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()


class LoggingOnlyWriter:
  """Non-zero processes: log scalars, write nothing."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(np.asarray(v)):.6g}"
                                            for k, v in scalars.items()))

  def write_images(self, step, images):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(logdir, *, just_logging: bool = False):
  if just_logging:
    return LoggingOnlyWriter()
  logdir = paths.workdir_path(logdir)  # gs:// stays a URL
  logdir.mkdir(parents=True, exist_ok=True)
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:  # clu's TensorBoard writer needs TensorFlow
    return TensorboardXWriter(logdir)
  return metric_writers.create_default_writer(str(logdir))
