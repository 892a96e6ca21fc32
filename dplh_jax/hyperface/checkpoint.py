"""Orbax checkpoints of everything a DP run needs to resume without lying.

A checkpoint holds, as one atomic step directory: the train state (params,
optimizer state with the DP noise key, step) and a JSON record with the
Poisson sampler's state, the accountant's phases, the privacy plan and the
run's whole config (``record['config']``, the record is
``<directory>/<step>/record/metadata``). Saving them together is what makes
a resume safe:

* the noise key is restored from the state, never re-derived from a seed, so
  no key used before the checkpoint is used again after it (docs/DESIGN.md,
  Privacy rules, rule 5);
* the accountant restored is the one that counted exactly the steps in the
  restored params, so nothing is counted twice or forgotten (docs/DESIGN.md,
  Privacy rules, rule 6); ``train`` checks its step count against the train
  step, the noise draws and the sampler draws, and the record's config against
  ``config.json``, before resuming, so a record edited inconsistently is
  refused. (A record edited consistently by someone with write access to the
  workdir cannot be told apart from a real one: nothing here is signed.)

``train`` saves a checkpoint at step 0, before the first step, so there is
always one to resume from. Steps run after the last checkpoint of a killed
run are replayed on resume with the same sampler state and noise key, and
``train`` refuses the resume unless the config is the one the workdir
started with (``run_binding``): the replay then reproduces the same updates,
bit for bit, instead of releasing a second, differently-noised or
differently-computed version of them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointNotSaved(OSError):
  """A checkpoint could not be written; the earlier ones are intact."""


def _reason(error: Exception) -> str:
  """The cause of a failed write in a few words (Orbax wraps some of them
  in long TensorStore messages)."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror.lower()
  text = str(error)
  if 'No space left' in text or 'RESOURCE_EXHAUSTED' in text:
    return os.strerror(errno.ENOSPC).lower()
  return text.splitlines()[0][:200] if text else type(error).__name__


class _DropOrbaxErrors(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and 'orbax' in record.pathname)


@contextlib.contextmanager
def _orbax_errors_hidden():
  """Orbax logs each failed write with its traceback from its threads; the
  save re-raises the failure as one :class:`CheckpointNotSaved` instead."""
  quiet = _DropOrbaxErrors()
  logger = logging.getLogger('absl')
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _remove_unfinished_saves(directory: str) -> None:
  """Removes the temporary folders of saves that failed half-way (a full
  disk); finished checkpoints are never temporary. Done here rather than by
  Orbax's ``cleanup_tmp_directories``, whose background thread logged a
  traceback when the process ended right after (a refused config)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if '.orbax-checkpoint-tmp' in name:
      shutil.rmtree(os.path.join(directory, name))


class Checkpointer:
  """Saves and restores ``(train_state, record)`` pairs under a directory.

  Saves are synchronous: ``train`` waits for each one anyway, and a failed
  background save left Orbax waiting minutes on a barrier at close.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._directory = os.path.abspath(directory)
    _remove_unfinished_saves(self._directory)
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, train_state: Any, record: dict[str, Any]) -> None:
    """Writes the checkpoint and waits until it is complete on disk.

    Raises:
      CheckpointNotSaved: the write failed (full disk, read-only folder); the
        message names the folder and the latest checkpoint still there.
    """
    try:
      with _orbax_errors_hidden():
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            record=ocp.args.JsonSave(record)))
        self._manager.wait_until_finished()
    except (OSError, ValueError) as error:
      # Orbax raises a write failure as OSError, or as ValueError holding
      # TensorStore's status; any other error is not the disk's, so it is
      # left as it is.
      if not isinstance(error, OSError) and 'RESOURCE_EXHAUSTED' not in str(
          error) and 'Failed writing' not in str(error):
        raise
      self._manager.reload()  # Forget the step that was not written.
      latest = self.latest_step()
      kept = ('no earlier checkpoint' if latest is None
              else f'the step-{latest} checkpoint is intact')
      raise CheckpointNotSaved(
          f'could not write the step-{step} checkpoint to {self._directory} '
          f'({_reason(error)}); {kept}. Free space or make the folder '
          'writable, then re-run the same command to resume.') from error

  def restore(self, train_state_like: Any) -> tuple[Any, dict[str, Any]]:
    """The latest checkpoint, shaped like ``train_state_like``."""
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError('No checkpoint to restore.')
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(train_state_like),
        record=ocp.args.JsonRestore()))
    return restored['state'], restored['record']

  def restore_record(self) -> dict[str, Any]:
    """The JSON record of the latest checkpoint alone (no arrays read)."""
    step = self.latest_step()
    if step is None:
      raise FileNotFoundError('No checkpoint to restore.')
    return self._manager.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore()))['record']

  def close(self) -> None:
    self._manager.close()
