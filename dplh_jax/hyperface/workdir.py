"""A training workdir bound to its config (docs/DESIGN.md, Privacy rules 5, 6).

The face application's side of ``dplh_jax.dp.run_binding``: which config
fields a resume may change, the config saved in the workdir and in every
checkpoint, and the checks of a restored checkpoint against this run's plan.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from dplh_jax.dp import dp_transform
from dplh_jax.dp import run_binding
from dplh_jax.hyperface import checkpoint
from dplh_jax.hyperface import run_info
from dplh_jax.hyperface import writable


# Config fields a resume may change. Each changes neither what is computed
# (params, noise, sampled batches, proposals, dropout) nor what is released
# (evaluation metrics, the privacy report); every other field binds the
# workdir (run_binding.check_config_unchanged).
# * log_every: which steps print and write train metrics. Those are
#   monitoring computed without noise, outside the guarantee (metric_writer),
#   and do not feed the computation.
# * checkpoint_every: where a later crash would resume from; the replay from
#   any checkpoint reproduces the same steps.
# * data_dir: where the same TFDS dataset is stored (the dataset name and
#   num_train_examples still bind; the plan check below catches another size).
# * num_devices: how many devices the step is sharded over. The replay on
#   another count samples the same images (the sampler does not depend on
#   it) and adds the same noise (the same key, drawn replicated), to the
#   same clipped sum summed in another order: it matches to float32
#   rounding, as a resume on other hardware (another GPU model, CPU instead
#   of GPU) does, which a workdir cannot bind either. The process count is
#   not a field and does not bind for the same reason. Binding them would
#   keep a preempted job from resuming on a smaller or larger slice. The
#   run prints a note when it resumes on another layout (the checkpoint
#   records it).
# * image_eval_images: the image-level evaluation after the last step. It
#   reads only the final params (the release itself) and the test split,
#   feeds nothing back and writes its own file (image_eval.json, rewritten
#   whole), so it is post-processing of the release: re-running a finished
#   run with it set adds the evaluation and changes nothing else.
# The evaluation fields (eval_every, eval_batch_size, num_eval_examples) are
# NOT here: they change which evaluations of the params are released, and on
# what, so a resume must not change them either.
RESUMABLE_FIELDS = frozenset({'log_every', 'checkpoint_every', 'data_dir',
                              'num_devices', 'image_eval_images'})


def check_workdir_writable(workdir: str) -> None:
  """The workdir and the folders a run writes into it are writable."""
  fix = 'pass a folder you can write to (a new one, or the run to resume)'
  writable.check_writable_folder(workdir, 'workdir', fix)
  for folder in ('checkpoints', 'tensorboard'):
    if os.path.isdir(os.path.join(workdir, folder)):
      writable.check_writable_folder(os.path.join(workdir, folder),
                                     'workdir folder', fix)


def bind_workdir(config: ml_collections.ConfigDict, workdir: str,
                  checkpointer: checkpoint.Checkpointer
                  ) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """``(config dict, latest checkpoint record or None)``; refuses a resume
  whose config differs from the one the workdir started with.

  Reads only JSON, so a refused resume fails in well under a second, before
  any data is loaded or noise calibrated.
  """
  current = run_binding.normalise(config.to_dict())
  saved = read_config(workdir)
  if saved is not None:
    run_binding.check_config_unchanged(saved, current, RESUMABLE_FIELDS)
  if checkpointer.latest_step() is None:
    return current, None  # fresh, or a run that died before its step-0 save
  record = checkpointer.restore_record()
  if 'config' not in record or saved is None:
    raise ValueError(
        f'The checkpoint in {workdir} comes without its config (config.json '
        'and the record\'s copy): it was written by an older version or '
        'edited, so what it computed cannot be checked; use a new workdir.')
  # Both copies must agree: a record edited to match a new config (or the
  # other way round) is refused.
  run_binding.check_config_unchanged(record['config'], saved,
                                     RESUMABLE_FIELDS)
  run_binding.check_config_unchanged(record['config'], current,
                                     RESUMABLE_FIELDS)
  return current, record


def write_config(config_dict: dict[str, Any], workdir: str,
                 layout: dict[str, int] | None = None) -> None:
  """``workdir/config.json``: ``{"config": the resolved config (what the
  workdir is bound to), "run": run_info.run_info() (what it ran on; with
  ``layout``, its ``num_devices`` and ``num_processes`` are the run's)}``."""
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    json.dump({'config': config_dict,
               'run': run_info.run_info() | (layout or {})}, f,
              sort_keys=True, indent=2)
    f.write('\n')
  os.replace(path + '.tmp', path)


def read_config(workdir: str) -> dict[str, Any] | None:
  """The config ``workdir/config.json`` binds the workdir to, or None."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if 'config' not in saved:
    raise ValueError(f'{path} holds no "config": it was written by an older '
                     'version; use a new workdir.')
  return saved['config']


def check_resume(record: dict[str, Any], config: ml_collections.ConfigDict,
                 plan, state, accountant) -> None:
  """Refuses a checkpoint whose plan or counters disagree with this run.

  The config is already known unchanged (``run_binding``); this catches what
  the config does not show (data of another size given to ``train``) and a
  record edited or corrupted on disk: every count of the steps run (train
  step, steps accounted, noise draws, sampler draws) must agree, and every
  accounted step must be one of this plan's (sigma, q).
  """
  # A field the record lacks was added later with a default that keeps
  # older runs' plans (no pre-training): the record has that default.
  saved = {field.name: record['privacy_plan'].get(field.name, field.default)
           for field in dataclasses.fields(plan)}
  now = dataclasses.asdict(plan)
  differing = [f'{field}: {saved[field]} -> {now[field]}'
               for field in now if saved[field] != now[field]]
  if differing:
    raise ValueError(
        f'The checkpoint in this workdir ran another privacy plan '
        f'({"; ".join(differing)}); was other data given? Use a new workdir.')
  counters = {'sampler_draws': record['sampler']['steps_sampled']}
  if config.dp:
    counters['accountant_steps'] = accountant.steps
    counters['noise_draws'] = int(dp_transform.dp_state(state.opt_state).num_updates)
  elif accountant.steps:
    raise ValueError(f'The checkpoint is inconsistent: a non-private run '
                     f'records accountant_steps={accountant.steps}; use a new '
                     'workdir.')
  run_binding.check_counters_agree(int(state.step), **counters)
  other = [phase for phase in accountant.phases
           if (phase.noise_multiplier, phase.sampling_prob)
           != (plan.noise_multiplier, plan.sampling_prob)]
  if other:
    raise ValueError(
        f'The checkpoint is inconsistent: its accountant holds phases '
        f'{[dataclasses.asdict(p) for p in other]} that are not this run\'s '
        f'(noise_multiplier={plan.noise_multiplier}, '
        f'sampling_prob={plan.sampling_prob}); use a new workdir.')
  # The steps trained so far, by phase (pre-training, then the main run),
  # as the plan says they are recorded: a resume in either phase composes
  # its remaining steps into the right one.
  by_phase = [(phase.name, phase.steps) for phase in accountant.phases]
  expected = plan.phase_steps(0, int(state.step)) if config.dp else []
  # Unfiltered: the train loop never records an empty phase, so one in the
  # record was put there by hand (and recompute_epsilon could not read it).
  if by_phase != expected:
    raise ValueError(
        f'The checkpoint is inconsistent: its accountant records the phases '
        f'{by_phase} (name, steps), this plan {expected} at train step '
        f'{int(state.step)}; use a new workdir.')
