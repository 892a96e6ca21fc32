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
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.hyperface import parallel


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


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

  @classmethod
  def from_config(cls, config, model, weighting, noise_multiplier):
    return cls(model, weighting, config.dp, config.l2_norm_clip,
               noise_multiplier, config.expected_batch_size, config.optimizer,
               config.learning_rate, config.momentum, config.microbatch_size,
               config.clipping)


def make_optimizer(spec: StepSpec, noise_key) -> optax.GradientTransformation:
  """``dp_aggregate`` (if DP) chained with the configured optimizer."""
  if spec.optimizer == 'adam':
    optimizer = optax.adam(spec.learning_rate)
  else:
    momentum = spec.momentum if spec.optimizer == 'momentum' else None
    optimizer = optax.sgd(spec.learning_rate, momentum=momentum)
  if not spec.dp:
    return optimizer
  return optax.chain(
      dp_transform.dp_aggregate(spec.l2_norm_clip, spec.noise_multiplier,
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
      spec.l2_norm_clip, has_aux=True, microbatch_size=spec.microbatch_size)


def make_train_step(spec: StepSpec, mesh: jax.sharding.Mesh | None = None):
  """The pure step ``(state, batch, rng) -> (state, metrics)``.

  With a ``mesh``, the batch is sharded along its ``'data'`` axis: each
  device clips and sums its block and the sums are added
  (``parallel.sharded_clipped_sum``) before the noise, added once.
  """
  example_loss = functools.partial(losses.loss_from_outputs,
                                   weighting=spec.weighting)
  clipped_sum = clipped_sum_fn(spec) if spec.dp else None
  if clipped_sum is not None and mesh is not None:
    clipped_sum = parallel.sharded_clipped_sum(clipped_sum, mesh)
  # The construction key is never read by update(): the key is in the state.
  tx = make_optimizer(spec, noise_key=0)

  def mean_over_images(values, is_real):
    weights = is_real.astype(jnp.float32)
    denominator = jnp.maximum(jnp.sum(weights), 1.0)
    return jax.tree.map(
        lambda v: jnp.tensordot(weights, v.astype(jnp.float32), axes=1)
        / denominator, values)

  def train_step(state: TrainState, batch, rng):
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
    return TrainState(state.step + 1, params, opt_state), step_metrics

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
