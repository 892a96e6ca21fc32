"""The pure HyperFace train step and what it is built from.

``make_train_step(spec)`` returns ``(state, batch, rng) -> (state, metrics)``.
With DP the batch is the padded Poisson sample and the gradient is the sum of
per-image clipped gradients (one image, all its proposals, is one privacy
unit; docs/DESIGN.md, Privacy rules, rule 1), noised once by ``dp_aggregate``
in the optimizer chain; without DP it is the mean gradient of the real images.
Everything the compiled step depends on is in the hashable ``StepSpec``, so
runs with equal specs share one compilation (``compiled_train_step``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dplh_jax.dp import dp_transform
from dplh_jax.dp import group_clipping
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example
from dplh_jax.hyperface import clip_groups
from dplh_jax.hyperface import detection_pretrain
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.hyperface import parallel


class TrainState(flax.struct.PyTreeNode):
  """The train state. ``averaged_params`` is the exponential moving average
  of the released ``params`` when ``config.ema_decay`` > 0, else None."""
  step: jax.Array
  params: Any
  opt_state: Any
  averaged_params: Any = None


def initial_state(params, opt_state, ema_decay: float) -> TrainState:
  """The state before the first step (the average starts at ``params``, in
  buffers of its own: the step donates the state)."""
  return TrainState(jnp.int32(0), params, opt_state,
                    jax.tree.map(jnp.copy, params) if ema_decay else None)


def evaluated_params(state: TrainState) -> Any:
  """The parameters a run evaluates, checkpoints for use and exports: the
  average when there is one, else the last step's."""
  if state.averaged_params is not None:
    return state.averaged_params
  return state.params


def averaged(average, params, step: jax.Array, decay: float):
  """One update of the parameter average (Polyak-Ruppert, exponential).

  The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so the random
  initialization is forgotten within the first steps. The average is a
  function of the released parameters alone: post-processing, no privacy
  cost (docs/DESIGN.md, Privacy rules).
  """
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda a, p: rate * a + (1.0 - rate) * p, average,
                      params)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the train step's computation depends on (hashable).

  Runs with equal specs share one compiled step. The DP noise key is not part
  of it: the step reads the key from the optimizer state, never from how the
  transform was built.
  """
  model: models.HyperFace
  weighting: Any
  dp: bool
  l2_norm_clip: float
  noise_multiplier: float
  expected_batch_size: float
  optimizer: str
  learning_rate: float
  momentum: float
  microbatch_size: int | None
  clipping: str
  learning_rate_schedule: str = 'constant'
  warmup_steps: int = 0
  num_steps: int = 0
  ema_decay: float = 0.0
  # Per-group clip norms (clip_groups.py) or None: l2_norm_clip over the
  # whole gradient. Read through clip_spec(spec).
  clip_norms: group_clipping.GroupClipNorms | float | None = None
  # The first steps that pre-train detection (detection_pretrain.py): the
  # other tasks masked out of the loss, their parameters frozen. 0: none.
  detection_pretrain_steps: int = 0

  @classmethod
  def from_config(cls, config, model, weighting, noise_multiplier,
                  num_steps: int = 0, detection_pretrain_steps: int = 0):
    """The spec of ``config``'s step; ``num_steps`` (the planned steps) is
    needed by the cosine schedule only."""
    return cls(model, weighting, config.dp, config.l2_norm_clip,
               noise_multiplier, config.expected_batch_size, config.optimizer,
               config.learning_rate, config.momentum, config.microbatch_size,
               config.clipping, config.learning_rate_schedule,
               config.warmup_steps, num_steps, config.ema_decay,
               clip_norms=clip_groups.clip_norms(config, model),
               detection_pretrain_steps=detection_pretrain_steps)


def learning_rate(spec: StepSpec) -> float | optax.Schedule:
  """The learning rate, or its schedule over the optimizer's update count.

  A schedule depends on the step count alone, which is public, so it costs
  no privacy; its count is in the optimizer state, saved and restored with
  it, so a resumed run continues the same schedule.

  Raises:
    ValueError: a cosine schedule without at least one step after warm-up.
  """
  if spec.learning_rate_schedule == 'cosine':
    if spec.num_steps <= spec.warmup_steps:
      raise ValueError(
          f'config.warmup_steps={spec.warmup_steps}: the cosine schedule '
          f'needs steps after the warm-up, and the run plans '
          f'{spec.num_steps}; lower warmup_steps or train longer.')
    return optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, spec.warmup_steps,
        decay_steps=spec.num_steps, end_value=0.0)
  if spec.warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, spec.learning_rate, spec.warmup_steps),
         optax.constant_schedule(spec.learning_rate)], [spec.warmup_steps])
  return spec.learning_rate


def clip_spec(spec: StepSpec) -> float | group_clipping.GroupClipNorms:
  """What each image's gradient is clipped to: ``spec.clip_norms`` or, when
  None, the one norm ``spec.l2_norm_clip``. The clipping and
  ``dp_aggregate`` both get this object, so the noise is calibrated to the
  sensitivity the sum was clipped to (``sqrt(sum_g C_g**2)``, which
  ``clip_groups`` makes ``l2_norm_clip``)."""
  return spec.l2_norm_clip if spec.clip_norms is None else spec.clip_norms


def make_optimizer(spec: StepSpec, noise_key) -> optax.GradientTransformation:
  """``dp_aggregate`` (if DP) chained with the configured optimizer; with
  detection pre-training, the parameters off the detection path get an
  optimizer of their own that starts after it (post-processing of the
  noised gradient, ``detection_pretrain.with_frozen_start``)."""
  rate = learning_rate(spec)

  def optimizer_at(offset: int) -> optax.GradientTransformation:
    """The optimizer, its schedule read ``offset`` steps ahead."""
    shifted = (rate if offset == 0 or not callable(rate)
               else lambda count: rate(count + offset))
    if spec.optimizer == 'adam':
      return optax.adam(shifted)
    momentum = spec.momentum if spec.optimizer == 'momentum' else None
    return optax.sgd(shifted, momentum=momentum)

  optimizer = (detection_pretrain.with_frozen_start(
      optimizer_at, spec.detection_pretrain_steps)
               if spec.detection_pretrain_steps else optimizer_at(0))
  if not spec.dp:
    return optimizer
  return optax.chain(
      dp_transform.dp_aggregate(clip_spec(spec), spec.noise_multiplier,
                                spec.expected_batch_size, noise_key),
      optimizer)


def clipped_sum_fn(spec: StepSpec):
  """``(params, batch, rng, is_padding_example) -> (ClippedSum, aux)``.

  ``'one_pass'`` (dplh_jax.dp.one_pass_clipping) and ``'vmap'``
  (dplh_jax.dp.per_example) compute the same clipped sum of the same per-image
  loss, with the same guarantee; one-pass avoids vmap's batch-grouped
  convolutions.
  """
  clipped_grad_sum = (per_example.clipped_grad_sum if spec.clipping == 'vmap'
                      else one_pass_clipping.clipped_grad_sum)
  return clipped_grad_sum(
      functools.partial(losses.per_image_loss, model=spec.model,
                        weighting=spec.weighting),
      clip_spec(spec), has_aux=True, microbatch_size=spec.microbatch_size)


def make_train_step(spec: StepSpec, mesh: jax.sharding.Mesh | None = None,
                    clipped_sum_wrapper=None):
  """The pure step ``(state, batch, rng) -> (state, metrics)``.

  With a ``mesh``, the batch is sharded along its ``'data'`` axis: each
  device clips and sums its block and the sums are added
  (``parallel.sharded_clipped_sum``) before the noise, added once.

  ``clipped_sum_wrapper`` (audits only, DP only; None in training) maps the
  step's clipped-sum function to another with its signature, e.g.
  ``gradient_canaries.with_gradient_canaries`` adding canary gradients to
  the (global) clipped sum before the noise.
  """
  example_loss = functools.partial(losses.loss_from_outputs,
                                   weighting=spec.weighting)
  clipped_sum = clipped_sum_fn(spec) if spec.dp else None
  if clipped_sum is not None and mesh is not None:
    clipped_sum = parallel.sharded_clipped_sum(clipped_sum, mesh)
  if clipped_sum_wrapper is not None:
    if not spec.dp:
      raise ValueError('clipped_sum_wrapper needs a DP step (config.dp=True)'
                       '; a non-private step has no clipped sum to wrap.')
    clipped_sum = clipped_sum_wrapper(clipped_sum)
  # The construction key is never read by update(): the key is in the state.
  tx = make_optimizer(spec, noise_key=0)

  def mean_over_images(values, is_real):
    weights = is_real.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(weights), 1.0)
    return jax.tree.map(
        lambda v: jnp.tensordot(weights, v.astype(jnp.float32), axes=1)
        / denominator, values)

  def train_step(state: TrainState, batch, rng):
    if spec.detection_pretrain_steps:  # detection only in the first steps
      batch = detection_pretrain.mask_tasks(
          batch, state.step < spec.detection_pretrain_steps)
    is_real = ~batch['is_padding_example']
    if spec.dp:
      gradient, aux = clipped_sum(
          state.params, batch, rng,
          is_padding_example=batch['is_padding_example'])
    else:
      def batch_loss(params):
        # The whole batch as one flat batch of crops: faster than a vmap
        # of per_image_loss; dropout masks differ from it, not their law.
        outputs = models.apply_to_images(spec.model, params, batch['crops'],
                                         rng)
        image_losses, aux = jax.vmap(example_loss, (None, 0, 0))(
            params, outputs, batch)
        return mean_over_images(image_losses, is_real), aux
      gradient, aux = jax.grad(batch_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(gradient, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Train metrics are computed from private data without noise: they are
    # for watching the run, not covered by the privacy guarantee.
    step_metrics = {
        f'train_loss_{task}': value
        for task, value in mean_over_images(
            {'total': aux['total_loss'], **aux['task_losses']},
            is_real).items()
    }
    if 'sigma' in aux:
      step_metrics |= {f'task_sigma_{task}': value[0] for task, value in
                       aux['sigma'].items()}
    if spec.dp:
      dp_state = dp_transform.dp_state(opt_state)
      step_metrics |= {'clipped_fraction': dp_state.clipped_fraction,
                       'non_finite_examples': dp_state.num_non_finite,
                       'realized_batch_size': dp_state.realized_batch_size}
    average = None if state.averaged_params is None else averaged(
        state.averaged_params, params, state.step, spec.ema_decay)
    return TrainState(state.step + 1, params, opt_state,
                      average), step_metrics

  return train_step


@functools.lru_cache(maxsize=4)
def compiled_train_step(spec: StepSpec,
                        mesh: jax.sharding.Mesh | None = None):
  """The jitted step for ``spec`` (on ``mesh``), shared by every run with
  that spec and mesh.

  On a mesh the state, the key and the metrics are replicated and the batch
  sharded along ``'data'``, fixed here so a resumed run (whose restored
  state has the template's shardings) reuses the one compiled step.
  """
  step = make_train_step(spec, mesh)
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  return jax.jit(step, in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)
