"""DP (or non-private) training and evaluation of HyperFace on a face dataset.

``train_and_evaluate(config, workdir)`` is the whole job; the ``dplh-train``
command (``cli/train.py``) only parses flags. One DP step is::

    Poisson sample (rate q) -> per-image examples, padded -> clipped_grad_sum
    (per image: all its proposals, all five task losses and, with
    task_weighting='uncertainty', the learned log sigma^2 weights)
    -> dp_aggregate (noise once, / expected batch) -> optimizer
    -> accountant.compose(sigma, q, 1)

Privacy plan (``dplh_jax.dp.privacy_plan``). With ``target_epsilon`` alone,
sigma is calibrated so the planned steps spend at most the target. With
``noise_multiplier`` alone, the planned steps run and their epsilon is
reported. With both, training stops at the last step whose epsilon stays
within the target. Before the first step the whole remaining plan is checked
against the target, so a run never passes it.

Detection pre-training (``config.detection_pretrain_epochs`` > 0; DPLH
3.2.1, ``detection_pretrain``): the plan's first steps train detection
alone, at the same q and sigma (calibrated over all the steps), the other
tasks masked out of the loss and their parameters frozen; the accountant
records them as the phase ``detection_pretrain``, the rest as ``hyperface``.

Workdir and resume. A run holds ``workdir/.lock`` (``flock``) from start to end,
so a second process into the same workdir is refused at once. A fresh workdir is
bound to its config: ``config.json`` is written and a checkpoint is saved at
step 0, before the first step; every checkpoint record holds the config too.
Re-running in the workdir resumes from the latest checkpoint and replays the
steps after it with the saved noise key and sampler state, so a killed run's
steps are reproduced bit for bit, never re-released with other noise
(docs/DESIGN.md, Privacy rules, rule 5). For that the resume must compute what
the dead run computed: it is refused, before any data is loaded, if any config
field differs from the saved one but ``workdir.RESUMABLE_FIELDS`` (log_every,
checkpoint_every, data_dir, num_devices, image_eval_images: none changes what
is computed on the training data or released), and after restoring if the privacy plan differs or
the checkpoint's counters disagree (train step = steps accounted = noise draws =
sampler draws) or its accountant holds another (sigma, q), so the report always
counts exactly the steps trained (docs/DESIGN.md, Privacy rules, rule 6). Metric
lines of replayed steps replace the dead run's (``metric_writer``).

Devices and processes (``parallel``). By default the step is data parallel
over every device of every process: the padded batch sharded along a
``'data'`` mesh axis, each device clipping and summing its block, the sums
added, the noise added once to the global sum from one replicated key.
``config.num_devices`` takes fewer (one process). With several processes,
each trains on its share of each Poisson sample, all agree on the noise key
and the sampler's seed (drawn on process 0, broadcast), only process 0 writes
the report, metrics and config.json, and all save and restore checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections

from dplh_jax.dp import accounting
from dplh_jax.dp import dp_transform
from dplh_jax.dp import noise_keys
from dplh_jax.dp import privacy_plan
from dplh_jax.dp import privacy_report
from dplh_jax.dp.batch_selection import PoissonSampler
from dplh_jax.hyperface import chance_baseline
from dplh_jax.hyperface import checkpoint
from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import detection_pretrain
from dplh_jax.hyperface import evaluation
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import interrupts
from dplh_jax.hyperface import metric_writer
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import parallel
from dplh_jax.hyperface import prefetching
from dplh_jax.hyperface import progress as progress_lib
from dplh_jax.hyperface import public_init
from dplh_jax.hyperface import train_step as step_lib
from dplh_jax.hyperface import workdir as workdir_lib


def _to_python(tree) -> dict:
  return {k: float(v)
          for k, v in jax.device_get(parallel.local_copy(tree)).items()}


class _NoWriter:
  """What a process other than the main one writes: nothing."""

  def write(self, *args, **kwargs) -> None:
    del args, kwargs

  def close(self) -> None:
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: data_loading.Data | None = None) -> dict[str, Any]:
  """Trains, checkpoints, evaluates and writes the privacy report.

  Resumes from the latest checkpoint in ``workdir`` if there is one, and only
  if ``config`` is the config the workdir started with (up to
  ``RESUMABLE_FIELDS``) and the checkpoint's counters agree; holds
  ``workdir/.lock`` for the whole run, so a second process is refused.

  Args:
    config: the run's config (see ``dplh_jax/hyperface/configs/default.py``).
    workdir: where checkpoints, metrics and the privacy report go.
    data: the train and test sources; None loads ``config.dataset``. The
      privacy report counts ``len(data.train)`` examples, so a caller that
      adds examples (for example audit canaries) gets them accounted for.
      The workdir binding sees the config, not ``data``: a resume with other
      data of another size is refused by the privacy plan check; do not
      resume with other data of the same size.

  Returns:
    ``{'eval': held-out metrics, 'privacy': the privacy report, 'state':
    the final TrainState, 'baseline': the held-out metrics of the best
    constant predictions (``chance_baseline.constant_metrics``),
    'image_eval': with ``config.image_eval_images`` > 0 the image-level
    metrics also written to ``workdir/image_eval.json``
    (``image_eval.evaluate_final_params``; main process), else None}``.

  Raises:
    ValueError: a bad config or data, a workdir that is a file or not
      writable, a resume the workdir's binding refuses, or
      (``run_binding.WorkdirInUseError``) a workdir in use.
    checkpoint.CheckpointNotSaved: a checkpoint could not be written (full
      disk, read-only folder); the run stops at once, the earlier
      checkpoints intact.
  """
  workdir_lib.check_workdir_writable(workdir)
  with parallel.WorkdirLock(workdir, jax.process_index()):
    return _train_and_evaluate(config, workdir, data)


def _train_and_evaluate(config, workdir, data):
  """:func:`train_and_evaluate` with the workdir locked."""
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    return _run(config, workdir, data, checkpointer)
  finally:
    checkpointer.close()


def _run(config, workdir, data, checkpointer):
  config_dict, record = workdir_lib.bind_workdir(config, workdir, checkpointer)
  config_validation.validate_config(config)
  layout = parallel.make_layout(config.num_devices)
  say = functools.partial(print, file=sys.stderr, flush=True) if (
      layout.is_main) else lambda *args, **kwargs: None
  if record is None and layout.is_main:
    workdir_lib.write_config(config_dict, workdir, layout.describe())
  if data is None:  # The main process prepares the dataset, if need be.
    data = parallel.main_first(lambda: data_loading.load_data(config), layout)
  num_examples = len(data.train)
  model, weighting = model_setup.build_model(config)
  accountant = accounting.PrivacyAccountant(config.accountant)
  plan = privacy_plan.plan_privacy(
      num_examples=num_examples,
      expected_batch_size=config.expected_batch_size,
      num_epochs=config.num_epochs, dp=config.dp,
      noise_multiplier=config.noise_multiplier,
      target_epsilon=config.target_epsilon, delta=config.delta,
      accountant=config.accountant, spent=accountant,
      pretrain_epochs=config.detection_pretrain_epochs,
      phase_names=detection_pretrain.PHASE_NAMES)
  # One key and one sampler seed for all processes (drawn on process 0).
  noise_key, noise_source = noise_keys.secret_key(config.noise_seed)
  sampler_seed, sampler_source = noise_keys.secret_seed(config.sampler_seed)
  spec = step_lib.StepSpec.from_config(
      config, model, weighting, plan.noise_multiplier, plan.num_steps,
      detection_pretrain_steps=plan.pretrain_steps)
  tx = step_lib.make_optimizer(spec, noise_key)
  # A resumed run restores its params: the template needs only their shapes
  # (and the public source may be gone).
  params = (public_init.initial_params(config, model) if record is None
            else model_setup.init_params(config, model))
  # Committed (replicated on the mesh) like a restored checkpoint, so a
  # resumed run reuses the compiled step instead of compiling a second one.
  state = parallel.put_replicated(
      step_lib.initial_state(params, tx.init(params), config.ema_decay),
      layout)
  sampler = PoissonSampler(num_examples, config.expected_batch_size,
                           seed=sampler_seed)
  if record is not None:
    try:
      state, record = checkpointer.restore(state)
    except ValueError as error:  # Orbax: the saved tree is not this config's.
      raise ValueError(
          f'The checkpoint in {workdir} does not fit this config (did '
          'task_weighting, the model size or the optimizer change?); use a '
          f'new workdir. Orbax said: {error}') from error
    accountant = accounting.PrivacyAccountant.from_dict(record['accountant'])
    workdir_lib.check_resume(record, config, plan, state, accountant)
    sampler.load_state_dict(record['sampler'])
    # The restored key and sampler state come from the first run's seeds.
    noise_source = record['noise_seed_source']
    sampler_source = record['sampler_seed_source']
    say(f'Resumed from step {int(parallel.local_copy(state.step))}.')
    if record.get('layout', layout.describe()) != layout.describe():
      say(f'Note: resumed on {layout.describe()}, the checkpoint was written '
          f'on {record["layout"]}: the replayed steps match the first run\'s '
          'to float32 rounding (order of the sums), not bit for bit.')
  parallel.check_processes_agree(
      layout,
      config={k: v for k, v in config_dict.items()
              if k not in workdir_lib.RESUMABLE_FIELDS},
      training_set={'size': num_examples,
                    'ends': [data.train[0], data.train[num_examples - 1]]},
      params=state.params)

  def checkpoint_record(sampler_state):
    return {'sampler': sampler_state, 'accountant': accountant.to_dict(),
            'noise_seed_source': noise_source,
            'sampler_seed_source': sampler_source,
            'privacy_plan': dataclasses.asdict(plan), 'config': config_dict,
            'layout': layout.describe()}

  start = int(parallel.local_copy(state.step))
  if start > plan.num_steps:
    raise ValueError(f'The checkpoint in {workdir} is at step {start}, past '
                     f'the {plan.num_steps} steps this config plans; use a '
                     'new workdir.')
  if config.dp and config.target_epsilon is not None:
    # The remaining steps as the phases they will be recorded as.
    planned_epsilon = accountant.epsilon_after(
        config.delta, plan.noise_multiplier, plan.sampling_prob,
        plan.phase_steps(start, plan.num_steps))
    if planned_epsilon > config.target_epsilon:
      raise ValueError(f'The plan would spend epsilon={planned_epsilon:.4f} '
                       f'> target_epsilon={config.target_epsilon}.')
  devices = (f' on {layout.num_devices} devices' if layout.num_devices > 1
             else '') + (f' in {layout.num_processes} processes'
                         if layout.num_processes > 1 else '')
  say(f'Plan: {plan.num_steps} steps, q={plan.sampling_prob:.5f}, '
      f'noise_multiplier={plan.noise_multiplier:.4f}, {num_examples} '
      f'training images{devices}' + (
          f', the first {plan.pretrain_steps} pre-training detection only'
          if plan.pretrain_steps else '') + '.')
  if plan.num_steps < plan.requested_steps:
    say(f'Warning: target_epsilon={config.target_epsilon} at '
        f'noise_multiplier={plan.noise_multiplier} pays for only '
        f'{plan.num_steps} of the {plan.requested_steps} steps that '
        f'num_epochs={config.num_epochs} asks for; training stops there.')
  if record is None:
    # Bound before the first step: a run killed before its first periodic
    # checkpoint resumes here, with this noise key and sampler state, and
    # replays the same steps instead of drawing a fresh key.
    checkpointer.save(0, state, checkpoint_record(sampler.state_dict()))

  train_step = step_lib.compiled_train_step(spec, layout.mesh)
  base_rng = jax.random.key(config.seed)
  # Metrics of the steps this run replays were written by the dead run; so
  # was the final evaluation, if a finished run is resumed.
  writer = metric_writer.MetricWriter(
      workdir, resume_step=start,
      rewritten_splits=('eval',) if start == plan.num_steps else ()) if (
          layout.is_main) else _NoWriter()
  batches = prefetching.prefetch(input_pipeline.train_batches(
      data.train, sampler, data.pipeline_config, seed=config.seed,
      start_step=start, num_steps=plan.num_steps,
      layout=layout.batch_layout if layout.mesh is not None else None))
  timer_start, timer_steps = time.time(), 0
  progress = progress_lib.Progress(plan.num_steps, start)
  # From here a signal stops the run at the end of the step in flight, with
  # a checkpoint there; before (data, compilation) it acts as usual.
  with interrupts.StopOnSignal() as stop, parallel.CompileCounter(
      'train_step') as counter:
    for step, batch, sampler_state in batches:
      rng = jax.random.fold_in(base_rng, step)
      if layout.mesh is not None:
        batch, rng = (parallel.global_batch(batch, layout),
                      parallel.put_replicated(rng, layout))
      state, step_metrics = train_step(state, batch, rng)
      if config.dp:
        accountant.compose(plan.noise_multiplier, plan.sampling_prob, 1,
                           name=plan.phase_of_step(step))
      timer_steps += 1
      done = step + 1
      progress.step_done(done)
      if done % config.log_every == 0 or done == plan.num_steps:
        step_metrics = _to_python(step_metrics)
        rate = timer_steps / (time.time() - timer_start)
        epsilon = accountant.epsilon(config.delta) if config.dp else None
        writer.write(done, 'train', step_metrics | {
            'steps_per_second': rate, 'epsilon': epsilon})
        if layout.is_main:
          progress.print(done, epsilon, step_metrics)
        timer_start, timer_steps = time.time(), 0
      if (config.eval_every and done % config.eval_every == 0
          and done < plan.num_steps):  # The final evaluation follows the loop.
        writer.write(done, 'eval', evaluation.evaluate(
            evaluation.compiled_eval_step(model),
            parallel.local_copy(step_lib.evaluated_params(state)),
            data.test, data.pipeline_config, config))
      # Every process must stop at the same step (checkpoints and the step
      # are collectives), whichever received the signal.
      stop_now = parallel.any_process(stop.requested, layout)
      if (done % config.checkpoint_every == 0 or done == plan.num_steps
          or stop_now):
        try:
          checkpointer.save(done, state, checkpoint_record(sampler_state))
        except checkpoint.CheckpointNotSaved:
          writer.close()  # A resume replaces the lines after its checkpoint.
          raise
      if stop_now and done < plan.num_steps:
        writer.close()
        raise interrupts.TrainingInterrupted(
            done, stop.signal_number or signal.SIGTERM)  # another process's
  if counter.compiles > 1:  # One per run is expected; more: shapes changed.
    say(f'Warning: the train step compiled {counter.compiles} times.')

  # Every process evaluates its own copy of the params (they are
  # replicated), on its first device; only the main one writes.
  eval_metrics = evaluation.evaluate(
      evaluation.compiled_eval_step(model),
      parallel.local_copy(step_lib.evaluated_params(state)), data.test,
      data.pipeline_config, config)
  writer.write(int(state.step), 'eval', eval_metrics)
  writer.close()
  non_finite = (int(parallel.local_copy(
      dp_transform.dp_state(state.opt_state).total_non_finite))
                if config.dp else 0)
  report = privacy_report.make_report(
      accountant, dp=config.dp, delta=config.delta,
      l2_norm_clip=config.l2_norm_clip, num_examples=num_examples,
      expected_batch_size=config.expected_batch_size,
      privacy_unit=config.privacy_unit,
      non_finite_examples_dropped=non_finite,
      target_epsilon=config.target_epsilon, noise_seed_source=noise_source,
      sampler_seed_source=sampler_source,
      initialization=public_init.describe(config), **layout.describe())
  if layout.is_main:
    privacy_report.write_report(report,
                                os.path.join(workdir, 'privacy_report.json'))
  # Fitted on the evaluated images themselves, not on training images: the
  # baseline printed beside the metrics reads no private data.
  test_images = evaluation.eval_images(data.test, config)
  baseline = chance_baseline.constant_metrics(
      test_images, test_images, data.pipeline_config, config)
  image_metrics = None
  if config.image_eval_images and layout.is_main:
    # Post-processing of the release: the final params on whole test images.
    image_metrics = image_eval.evaluate_final_params(
        jax.device_get(parallel.local_copy(step_lib.evaluated_params(state))),
        config_dict,
        int(parallel.local_copy(state.step)), report, data.test,
        config.image_eval_images, workdir)
    say(f'Image-level evaluation: {image_eval.summary(image_metrics)} -> '
        f'{os.path.join(workdir, image_eval.RESULT_FILE)}')
  return {'eval': eval_metrics, 'privacy': report, 'state': state,
          'baseline': baseline, 'image_eval': image_metrics}
