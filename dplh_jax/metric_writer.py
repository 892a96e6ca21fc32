"""Metrics of a run: JSON lines, plus TensorBoard scalars without TensorFlow.

``workdir/metrics.jsonl`` gets one ``{'step', 'split', **metrics}`` line per
call; ``workdir/tensorboard/<split>/`` gets TensorBoard event files with every
numeric metric as a scalar (view with ``tensorboard --logdir
workdir/tensorboard``). The events are written with the ``tensorboard``
package's own protos and record writer, which need no TensorFlow.

A resumed run appends to both from its last checkpoint, so steps between that
checkpoint and the interruption appear twice; the later value is the one of
the run that went on.

Both hold the train-time monitoring metrics (losses, clip fraction, realized
batch size), computed from private data without noise: they are not covered
by the DP guarantee, so share them as you would the data.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from typing import Any

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import event_file_writer


def _scalars(values: dict[str, Any]) -> dict[str, float]:
  """The real-number entries, NaN and inf kept (a diverging loss must show);
  bools, None and strings left out."""
  return {key: float(value) for key, value in values.items()
          if isinstance(value, numbers.Real) and not isinstance(value, bool)}


def _json_scalar(value: Any) -> Any:
  """NumPy / JAX scalars as Python numbers, for ``json.dumps``."""
  if getattr(value, 'shape', None) == ():
    return value.item()
  raise TypeError(f'{value!r} ({type(value).__name__}) is not a metric scalar')


class MetricWriter:
  """Writes metrics of a run under ``workdir`` (see the module docstring)."""

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._events: dict[str, event_file_writer.EventFileWriter] = {}

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    self._jsonl.write(json.dumps({'step': step, 'split': split, **values},
                                 default=_json_scalar) + '\n')
    self._jsonl.flush()
    if split not in self._events:
      self._events[split] = event_file_writer.EventFileWriter(
          os.path.join(self._workdir, 'tensorboard', split))
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=value)
        for tag, value in _scalars(values).items()])
    events = self._events[split]
    events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                     summary=summary))
    events.flush()

  def close(self) -> None:
    self._jsonl.close()
    for events in self._events.values():
      events.close()
