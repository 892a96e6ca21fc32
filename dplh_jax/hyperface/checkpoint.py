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

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores ``(train_state, record)`` pairs under a directory."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, train_state: Any, record: dict[str, Any]) -> None:
    """Writes the checkpoint and waits until it is complete on disk."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        record=ocp.args.JsonSave(record)))
    self._manager.wait_until_finished()

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
