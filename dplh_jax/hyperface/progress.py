"""Progress lines a person reads: step, elapsed time, ETA, speed, losses."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def duration(seconds: float) -> str:
  """``m:ss``, or ``h:mm:ss`` from an hour on.

  >>> duration(75), duration(3725)
  ('1:15', '1:02:05')
  """
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else (
      f'{minutes}:{seconds:02d}')


class Progress:
  """Times a run of steps ``start_step + 1 .. num_steps`` and formats its
  progress lines.

  The speed and the ETA are measured from the end of the run's first step,
  so the compilation inside it does not make the ETA lie; until a second
  step is done the ETA reads ``--``.
  """

  def __init__(self, num_steps: int, start_step: int,
               clock: Callable[[], float] = time.monotonic):
    self._num_steps, self._clock = num_steps, clock
    self._start = clock()
    self._first: tuple[int, float] | None = (start_step, self._start)
    self._first_done = False

  def step_done(self, step: int) -> None:
    """Call after each step (``step`` counted from 1)."""
    if not self._first_done:
      self._first, self._first_done = (step, self._clock()), True

  def line(self, step: int, epsilon: float | None,
           values: dict[str, float]) -> str:
    """``step N/M [elapsed, ETA, speed] eps=... total=... <task>=...``; the
    losses are of the train batch, not covered by DP."""
    now = self._clock()
    first_step, first_time = self._first
    if step > first_step and now > first_time:
      rate = (step - first_step) / (now - first_time)
      timing = (f'ETA {duration((self._num_steps - step) / rate)}, '
                f'{rate:.2f} steps/s')
    else:
      timing = 'ETA --'
    spent = f' eps={epsilon:.3f}' if epsilon is not None else ''
    task_losses = {k.removeprefix('train_loss_'): v for k, v in values.items()
                   if k.startswith('train_loss_')}
    order = sorted(task_losses, key=lambda task: (task != 'total', task))
    losses = ' '.join(f'{task}={task_losses[task]:.3f}' for task in order)
    return (f'step {step}/{self._num_steps} [{duration(now - self._start)} '
            f'elapsed, {timing}]{spent} {losses}')

  def print(self, step: int, epsilon: float | None,
            values: dict[str, float]) -> None:
    print(self.line(step, epsilon, values), file=sys.stderr, flush=True)
