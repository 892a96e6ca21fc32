"""Ctrl-C and SIGTERM end a training run cleanly, at a step boundary.

Preemption (SIGTERM on GPU/TPU clusters) and Ctrl-C are the common ways a
run ends early. Inside :class:`StopOnSignal` a signal only sets a flag; the
training loop finishes the step in flight, writes a checkpoint (a
consistent one: the step's accounting and sampler state included), and
raises :class:`TrainingInterrupted`. Re-running the same command resumes
there. A second signal while the first is handled is ignored, so a
checkpoint is never cut half-written.
"""

from __future__ import annotations

import signal
import threading
import types


class TrainingInterrupted(Exception):
  """A run stopped by a signal after saving its checkpoint at ``step``."""

  def __init__(self, step: int, signal_number: int):
    self.step, self.signal_number = step, signal_number
    name = signal.Signals(signal_number).name
    super().__init__(f'{name}: interrupted at step {step}, checkpoint saved; '
                     're-run the same command to resume.')


class StopOnSignal:
  """Turns SIGINT and SIGTERM into a request to stop, for its duration.

  Only the main thread can install handlers; elsewhere (a notebook worker
  thread) it does nothing and signals act as usual.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signal_number: int | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_number is not None

  def _handle(self, signal_number: int, frame: types.FrameType | None) -> None:
    del frame
    if self.signal_number is None:
      self.signal_number = signal_number

  def __enter__(self) -> 'StopOnSignal':
    if threading.current_thread() is threading.main_thread():
      for number in self.SIGNALS:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for number, handler in self._previous.items():
      signal.signal(number, handler)
