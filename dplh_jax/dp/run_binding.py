"""Binds a workdir to one run: its config, its counters, one process at a time.

A resumed run replays the steps after its last checkpoint with the saved noise
key and sampler state (docs/DESIGN.md, Privacy rules, rule 5). That is safe only
if the replay computes exactly what the dead run computed: the same model, clip,
data, learning rate, seeds and plan. With anything else, the same noise would be
added to a different update and both would be released. So:

* :func:`check_config_unchanged` refuses a resume whose config differs from
  the one the workdir started with, except in fields that change neither
  what is computed nor what is released;
* :func:`check_counters_agree` refuses a checkpoint whose counters (steps
  accounted, noise draws, sampler draws) disagree with its train step, so a
  report always counts the steps that were trained (docs/DESIGN.md, Privacy
  rules, rule 6);
* :class:`WorkdirLock` keeps a second process out of a workdir in use, so
  two processes never train from (and re-release) the same checkpoint.

Generic: plain dicts in, no application imports.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
from typing import Any

_BOUND = ('a workdir is bound to the config it started with; use a new '
          '--workdir (or restore those values)')


def normalise(config: dict[str, Any]) -> dict[str, Any]:
  """The dict as JSON would store it (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(config, sort_keys=True))


def _same(a: Any, b: Any) -> bool:
  """JSON values equal, 1 and 1.0 alike, but bools only equal bools."""
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  if isinstance(a, int) and isinstance(b, int):
    return a == b  # exactly: 2**53 + 1 is another seed than 2**53
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    # A float field given as 1 on one command line and 1.0 on the other is
    # the same computation (ConfigDict stores both as float); an int equals
    # a float only when the float is that very integer.
    if isinstance(a, int) or isinstance(b, int):
      whole, other = (a, b) if isinstance(a, int) else (b, a)
      return other.is_integer() and int(other) == whole
    return a == b or (math.isnan(a) and math.isnan(b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(map(_same, a, b))
  return type(a) is type(b) and a == b


_MISSING = object()  # a field one of the configs lacks


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       may_change: frozenset[str] = frozenset()
                       ) -> list[str]:
  """``'field: saved -> now'`` for every differing field, sorted by name."""
  saved, current = normalise(saved), normalise(current)
  differences = []
  for field in sorted(saved.keys() | current.keys()):
    if field in may_change:
      continue
    old, new = saved.get(field, _MISSING), current.get(field, _MISSING)
    if old is _MISSING or new is _MISSING or not _same(old, new):
      differences.append(f'{field}: {_show(old)} -> {_show(new)}')
  return differences


def _show(value: Any) -> str:
  return '<absent>' if value is _MISSING else json.dumps(value)


def check_config_unchanged(saved: dict[str, Any], current: dict[str, Any],
                           may_change: frozenset[str] = frozenset()) -> None:
  """Raises ValueError listing every field that differs (one line).

  Args:
    saved: the flat config the workdir started with (``config.to_dict()``).
    current: the config of the run that wants to resume.
    may_change: fields ignored because they change neither what is computed
      nor what is released (e.g. how often to log or checkpoint).
  """
  differences = config_differences(saved, current, may_change)
  if differences:
    raise ValueError(f'The config differs from the one this workdir ran '
                     f'with: {"; ".join(differences)}; {_BOUND}.')


def check_counters_agree(step: int, **counters: int) -> None:
  """Raises ValueError naming each counter that is not equal to ``step``.

  Args:
    step: the train step of the checkpoint (updates applied to the params).
    **counters: other counts of the same steps, e.g. ``accountant_steps``
      (steps composed into the accountant), ``noise_draws`` (noise added),
      ``sampler_draws`` (batches sampled).
  """
  wrong = [f'{name}={int(value)}' for name, value in counters.items()
           if int(value) != int(step)]
  if wrong:
    raise ValueError(
        f'The checkpoint is inconsistent: at train step {int(step)} it '
        f'records {", ".join(wrong)} (each must equal the step); it was '
        'edited or corrupted, so its privacy cost cannot be trusted; use a '
        'new workdir.')


class WorkdirInUseError(ValueError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``workdir/.lock`` exclusively.

  Uses ``flock``: the lock is released on exit and by the kernel when the
  holding process dies, however it dies, so a stale lock file never blocks a
  resume. The file holds the holder's pid and hostname for the error message.
  (``flock`` is per host on most network file systems: do not share one
  workdir between machines.)
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, '.lock')
    self._fd: int | None = None

  def __enter__(self) -> 'WorkdirLock':
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 256).decode(errors='replace').split()
      os.close(fd)
      pid, host = (holder + ['?', '?'])[:2]
      raise WorkdirInUseError(
          f'workdir {self.workdir} is in use by another training process '
          f'(pid {pid} on {host}); wait for it to finish or use another '
          '--workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc_info) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
