"""Metrics of a run: JSON lines, plus TensorBoard scalars without TensorFlow.

``workdir/metrics.jsonl`` gets one ``{'step', 'split', **metrics}`` line per
call; ``workdir/tensorboard/<split>/`` gets TensorBoard event files with every
numeric metric as a scalar (view with ``tensorboard --logdir
workdir/tensorboard``). The events are written with the ``tensorboard``
package's own protos and record writer, which need no TensorFlow.

A resumed run (``resume_step`` given) replays the steps after its last
checkpoint, so each metric line of a replayed step would otherwise appear
twice. Before appending it drops them: ``metrics.jsonl`` is rewritten
(atomically) without the lines of steps after ``resume_step``, and every
split's new event file starts with ``SessionLog.START`` at ``resume_step +
1``, on which TensorBoard discards the earlier events of those steps. Each
``(step, split)`` is therefore reported once, with the value of the run that
went on (which, replaying the same noise on the same config, is the same).

Both hold the train-time monitoring metrics (losses, clip fraction, realized
batch size), computed from private data without noise: they are not covered
by the DP guarantee, so share them as you would the data.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Collection
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


def _drop_lines_after(path: str, keep) -> None:
  """Rewrites the JSON lines file with the lines ``keep`` accepts."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for number, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) - 1:  # cut off by the kill: never complete
        continue
      raise
    if keep(record):
      kept.append(line + '\n')
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def _event_file_time(name: str) -> int:
  try:
    return int(name.split('.')[3])
  except (IndexError, ValueError):
    return 0


class MetricWriter:
  """Writes metrics of a run under ``workdir`` (see the module docstring).

  Args:
    workdir: the run's directory.
    resume_step: for a resumed run, the step of the restored checkpoint:
      lines and events of later steps (which the run replays) are dropped.
    rewritten_splits: splits whose line AT ``resume_step`` the resumed run
      writes again (the final evaluation, when resuming a finished run);
      theirs are dropped too.
  """

  def __init__(self, workdir: str, resume_step: int | None = None,
               rewritten_splits: Collection[str] = ()):
    self._workdir = workdir
    self._events: dict[str, event_file_writer.EventFileWriter] = {}
    jsonl = os.path.join(workdir, 'metrics.jsonl')
    if resume_step is not None:
      def first_dropped(split):
        return resume_step if split in rewritten_splits else resume_step + 1
      _drop_lines_after(
          jsonl, lambda line: line['step'] < first_dropped(line['split']))
      tensorboard = os.path.join(workdir, 'tensorboard')
      splits = (sorted(os.listdir(tensorboard))
                if os.path.isdir(tensorboard) else [])
      for split in splits:
        self._open_events(split).add_event(event_pb2.Event(
            wall_time=time.time(), step=first_dropped(split),
            session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))
        self._events[split].flush()
    self._jsonl = open(jsonl, 'a')

  def _open_events(self, split: str) -> event_file_writer.EventFileWriter:
    """The split's event writer; a new file sorts after the existing ones."""
    if split not in self._events:
      directory = os.path.join(self._workdir, 'tensorboard', split)
      # TensorBoard reads a directory's files in name order, and names start
      # with the creation second: a file made in the same second as an
      # earlier one of this process could sort before it.
      latest = max((_event_file_time(name) for name in os.listdir(directory)),
                   default=0) if os.path.isdir(directory) else 0
      if 0 <= latest - int(time.time()) <= 1:  # (not for a skewed clock)
        time.sleep(max(0.0, latest + 1 - time.time()))
      self._events[split] = event_file_writer.EventFileWriter(directory)
    return self._events[split]

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    self._jsonl.write(json.dumps({'step': step, 'split': split, **values},
                                 default=_json_scalar) + '\n')
    self._jsonl.flush()
    self._open_events(split)
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
