"""The state of a ``make_private`` run: updates only in the plan and in order.

``make_private``'s transform wraps ``dp_aggregate`` chained with the
optimizer. Its state, :class:`PrivateState`, holds the chain's state (whose
``DpAggregateState.num_updates`` counts the noise draws) and the run's id
(128 bits, from OS entropy and the plan: ``make_private`` draws it). An
update takes a :class:`StepClippedSum`: the clipped sum of one
:class:`~dplh_jax.dp.batch_iterator.SampledBatch` with that batch's draw
number and real-row count. It is released only when the draw is the next
one (its number equals the count of noise draws), the plan's steps are not
all spent, the sum counts exactly the batch's real rows (it was masked) and
the state is this run's; otherwise, inside jit, the update is all zeros, no
noise is drawn, the state is unchanged and the refusal is counted. So the
noise draws, the sampler's draws, the run and the plan cannot disagree
unnoticed. An update under vmap is refused when traced: every member of the
batch would be released with the same noise.

:class:`PlannedSampler` is the run's Poisson sampler: it draws at most the
plan's steps and remembers its state after each recent draw, so a
checkpoint pairs the optimizer state with the sampler state of the same
step wherever in the loop it is taken (docs/DESIGN.md, Privacy rules 5).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import batch_selection
from dplh_jax.dp import clipped_sum
from dplh_jax.dp import dp_transform

PyTree = Any

# Draws whose sampler state is kept; a checkpoint must be within this many
# draws of the optimizer state's count (prefetching ahead is fine).
SAMPLER_HISTORY = 1024


class StepClippedSum(NamedTuple):
  """The clipped per-example gradient sum of one sampled batch.

  Attributes:
    clipped_sum: the ``ClippedSum`` of the batch, padding masked.
    step: int32 scalar, the batch's draw number (``SampledBatch.step``).
    num_real_examples: int32 scalar, the batch's real rows
      (``SampledBatch.num_real_examples``); an update is released only if
      ``clipped_sum.num_examples`` equals it, so an unmasked sum (which
      counts the padding rows too) is refused.
  """

  clipped_sum: clipped_sum.ClippedSum
  step: jax.Array
  num_real_examples: jax.Array


class PrivateState(NamedTuple):
  """State of ``make_private``'s transform.

  Attributes:
    inner: the state of ``dp_aggregate`` chained with the optimizer.
    run_id: uint32 ``(4,)``, the id of the run (and plan) the state was
      made under.
    refused_past_plan: updates refused because the plan's steps had run.
    refused_mismatched: updates refused because their batch was not the
      next draw, the state was another run's or the sum was unmasked; any
      of them means the optimizer state and the sampler went apart.
  """

  inner: PyTree
  run_id: jax.Array
  refused_past_plan: jax.Array
  refused_mismatched: jax.Array


def under_trace(params: PyTree) -> bool:
  """Whether the caller runs under jit, eval_shape, vmap or grad: with a
  traced ``params`` leaf, or where a fresh array is itself traced."""
  return any(isinstance(leaf, jax.core.Tracer)
             for leaf in jax.tree.leaves(params)) or isinstance(
                 jnp.zeros(()), jax.core.Tracer)


def initial_state(inner: optax.GradientTransformation, params: PyTree,
                  run_id: np.ndarray) -> PrivateState:
  """The state before the first update (no check: see ``planned_transform``)."""
  def zero():
    return jnp.zeros((), jnp.int32)
  return PrivateState(inner.init(params), jnp.asarray(run_id, jnp.uint32),
                      zero(), zero())


def planned_transform(inner: optax.GradientTransformation, *, num_steps: int,
                      run_id: Callable[[], np.ndarray],
                      claim_init: Callable[[], None]
                      ) -> optax.GradientTransformationExtraArgs:
  """``inner`` (``dp_aggregate`` first) releasing only planned, in-order steps.

  Guarantee: an update is ``inner``'s update (one noise draw) only if the
  state's count of noise draws ``n`` is below ``num_steps``, the input's
  ``step`` equals ``n``, the sum's ``num_examples`` equals
  ``num_real_examples`` and the state's ``run_id`` is ``run_id()``; any
  other update is all zeros, leaves the state (noise key included) as it
  was and increments a refusal count, inside jit. So at most ``num_steps``
  noise draws happen per state, each on the draw of its own number. An
  update under ``jax.vmap`` (any input batched, also around a jitted step)
  raises when traced: its members would share each noise draw. (Under
  ``shard_map`` or ``pmap``, ``psum`` the ``clipped_sum`` of every device's
  ``StepClippedSum`` and make one replicated update.)

  ``init`` refuses under a trace (jit, eval_shape, vmap: a compiled init
  could be called again without the check) and calls ``claim_init``, which
  raises on a second state; ``initial_state`` gives the abstract state.

  Args:
    inner: the chain ``dp_aggregate`` + optimizer.
    num_steps: the plan's steps.
    run_id: returns the run's id, uint32 ``(4,)`` (read when the update is
      traced; ``load_state_dict`` adopts a checkpoint's).
    claim_init: called once per ``init``; raises if a state exists.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`PrivateState`.
  """
  def init_fn(params):
    if under_trace(params):
      raise ValueError(
          'setup.init (tx.init) was called under jit, eval_shape or vmap, '
          'where a compiled copy could make more states with the same noise '
          'key; call setup.init(params) once on the host, and restore with '
          'setup.abstract_state(params).')
    claim_init()
    return initial_state(inner, params, run_id())

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(updates, StepClippedSum):
      raise ValueError(
          f'setup.tx takes setup.clipped_grad_sum(loss_fn)(params, batch), '
          f'the masked clipped sum of a batch of setup.batches(...), not '
          f'{type(updates).__name__}; per-example gradients or a ClippedSum '
          'carry no mask or draw number.')
    if extra_args.get('is_padding_example') is not None:
      raise ValueError('setup.clipped_grad_sum already applied the mask; do '
                       'not pass is_padding_example to setup.tx.update.')
    if not isinstance(state, PrivateState):
      raise ValueError(f'setup.tx needs the PrivateState of setup.init, got '
                       f'{type(state).__name__}.')
    updates, state, params = _refuse_vmap((updates, state, params))
    num_updates = dp_transform.dp_state(state.inner).num_updates
    in_plan = num_updates < num_steps
    matches = ((jnp.asarray(updates.step) == num_updates)
               & (updates.clipped_sum.num_examples
                  == jnp.asarray(updates.num_real_examples))
               & jnp.all(state.run_id == jnp.asarray(run_id(), jnp.uint32)))

    def release():
      return inner.update(updates.clipped_sum, state.inner, params)

    released = jax.eval_shape(release)

    def refuse():
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           released[0])
      # lax.cond needs both branches to return the same dtypes, and an
      # optimizer's first update may change one (e.g. a weakly typed count).
      same = jax.tree.map(lambda x, s: x.astype(s.dtype)
                          if x.dtype != s.dtype else x,
                          state.inner, released[1])
      return zeros, same

    new_updates, new_inner = jax.lax.cond(in_plan & matches, release, refuse)
    return new_updates, PrivateState(
        new_inner, state.run_id,
        state.refused_past_plan + (~in_plan).astype(jnp.int32),
        state.refused_mismatched + (in_plan & ~matches).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@jax.custom_batching.custom_vmap
def _refuse_vmap(tree: PyTree) -> PyTree:
  """``tree`` itself; under ``jax.vmap`` with any leaf batched, raises when
  traced (a batching rule runs for vmap inside or around jit alike)."""
  return tree


@_refuse_vmap.def_vmap
def _(axis_size, in_batched, tree):
  del in_batched, tree
  raise ValueError(
      f'setup.tx.update is under jax.vmap (axis of size {axis_size}): every '
      'member would be released with the same noise draw; make one update '
      'per step (psum the clipped sums of shards first).')


def find_private_state(opt_state: PyTree) -> PrivateState:
  """The :class:`PrivateState` inside ``opt_state`` (it may be wrapped, as
  in a Flax ``TrainState``), found by type."""
  return dp_transform.find_state(opt_state, PrivateState,
                                 'was it made by setup.init of this setup?')


class PlannedSampler(batch_selection.PoissonSampler):
  """The run's Poisson sampler: at most ``num_steps`` draws, recent states kept.

  The same samples as a ``PoissonSampler`` of the same seed. Its
  ``load_state_dict`` is refused: ``PrivateSetup.load_state_dict`` restores
  it together with the optimizer state, after checking both (``restore``).
  """

  def __init__(self, num_examples: int, expected_batch_size: float, *,
               num_steps: int, seed: int | None = None,
               padded_batch_size: int | None = None):
    super().__init__(num_examples, expected_batch_size, seed=seed,
                     padded_batch_size=padded_batch_size)
    self.num_steps = int(num_steps)
    self._states = {0: self.state_dict()}

  def sample(self) -> batch_selection.SampledIndices:
    """The next draw; refused once the plan's steps are drawn."""
    if self.steps_sampled >= self.num_steps:
      raise ValueError(f'The plan\'s {self.num_steps} steps are drawn; a '
                       'further sample would be a step the budget does not '
                       'pay for.')
    sample = super().sample()
    self._states[self.steps_sampled] = self.state_dict()
    self._states.pop(self.steps_sampled - SAMPLER_HISTORY, None)
    return sample

  def state_after(self, draws: int) -> dict[str, Any]:
    """The sampler's state right after its ``draws``-th draw."""
    if draws not in self._states:
      raise ValueError(
          f'The sampler state after draw {draws} is not held (this setup '
          f'drew {self.steps_sampled}, and keeps the last {SAMPLER_HISTORY}); '
          'take the checkpoint from this run\'s optimizer state, within '
          f'{SAMPLER_HISTORY} draws of the latest.')
    return self._states[draws]

  def load_state_dict(self, state: dict[str, Any]) -> None:
    raise ValueError('Restore the sampler with setup.load_state_dict('
                     'opt_state, record), which checks it against the plan '
                     'and the optimizer state.')

  def restore(self, state: dict[str, Any]) -> None:
    """Restores a ``state_dict`` (checked by the caller against the plan)."""
    super().load_state_dict(state)
    self._states = {self.steps_sampled: self.state_dict()}
