"""DP-SGD set up in one call: a calibrated transform, its sampler and its plan.

:func:`make_private` is the functional counterpart of Opacus's
``make_private_with_epsilon``: from the size of the data, the expected batch
size, the length of training, a target epsilon, delta and the clip norm, it
calibrates the noise multiplier (``privacy_plan``) and returns a
:class:`PrivateSetup`. A run threads ONE optimizer state, from
``setup.init(params)``; it counts the noise draws, so the epsilon spent is
read from it and cannot drift from what ran. The state carries the run's
id, 128 bits drawn from OS entropy by ``make_private`` (bound to the plan),
so a state of another run, even one of identical settings, releases nothing.
``setup.state_dict`` saves the run id, the plan and the sampler state of the
same step, so a resume under another plan, with another run's record or with
the two out of step, is refused (``private_state`` holds the mechanism).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import accounting
from dplh_jax.dp import batch_iterator
from dplh_jax.dp import dp_transform
from dplh_jax.dp import noise_keys
from dplh_jax.dp import per_example
from dplh_jax.dp import privacy_plan
from dplh_jax.dp import privacy_report
from dplh_jax.dp import private_state

PyTree = Any
PrivateState = private_state.PrivateState
StepClippedSum = private_state.StepClippedSum


class PrivateSetup:
  """A DP-SGD run's transform, sampler and plan, made by :func:`make_private`.

  Guarantee: ``tx`` releases an update only for the next batch that
  ``batches(...)`` drew, clipped by :meth:`clipped_grad_sum` (the padding
  mask applied), to a state of this run, and at most ``plan.num_steps`` of
  them; every other update is zeros with no noise drawn, and one under
  ``jax.vmap`` raises (``private_state``). If one example's loss depends
  on that example alone and everything learned is in the parameters given
  to ``tx``, the sequence of updates, and anything
  computed from the parameters alone, is ``(epsilon_spent(opt_state),
  delta)``-DP for adding or removing one example, and ``(target_epsilon,
  delta)``-DP, since at most ``plan.num_steps`` updates run: fewer steps of
  the same mechanism leak no more, and sigma is calibrated so that all of
  them stay within the target.

  .. warning::
    Make the optimizer state once per setup, with ``setup.init(params)`` on
    the host (``tx.init`` is the same call): a second state would draw the
    same noise, so it is refused, as is any init under jit, eval_shape or
    vmap. One setup per process: a child made by ``os.fork`` or
    ``multiprocessing`` copies the setup but not the once-only claim. To
    resume, restore the saved state into ``setup.abstract_state(params)``
    and call ``setup.load_state_dict``.

  .. warning::
    Resume each checkpoint at most once, with identical code, data and
    params: a second resume of it draws the same noise keys on the same
    batches, so the difference of the two runs' updates is noise-free.

  .. warning::
    The record of :meth:`state_dict` and the optimizer state are secret:
    the sampler state lets one recompute every past batch (removing the
    amplification by sampling) and the noise key every later noise draw.
    Only the params and :meth:`report` are released.

  Attributes:
    tx: ``dp_aggregate`` chained with the optimizer, releasing only planned,
      in-order updates; its state is a ``PrivateState``.
    sampler: the run's Poisson sampler (``private_state.PlannedSampler``).
    plan: the ``privacy_plan.PrivacyPlan``: sigma, q, steps.
    delta: the target delta.
    target_epsilon: the budget the plan was calibrated to.
    l2_norm_clip: the clip norm ``C``.
    expected_batch_size: the public divisor ``q * num_examples``.
    accountant: ``'pld'`` or ``'rdp'``.
  """

  def __init__(self, *, optimizer: optax.GradientTransformation,
               plan: privacy_plan.PrivacyPlan, delta: float,
               target_epsilon: float, l2_norm_clip: float,
               expected_batch_size: float, accountant: str,
               num_examples: int, noise_seed: int | None,
               sampler_seed: int | None, padded_batch_size: int | None):
    """Builds the run from a calibrated ``plan``; call :func:`make_private`,
    which calibrates it and checks the arguments."""
    self.plan = plan
    self.delta = float(delta)
    self.target_epsilon = float(target_epsilon)
    self.l2_norm_clip = float(l2_norm_clip)
    self.expected_batch_size = float(expected_batch_size)
    self.accountant = accountant
    self.sampler = private_state.PlannedSampler(
        num_examples, expected_batch_size, num_steps=plan.num_steps,
        seed=sampler_seed, padded_batch_size=padded_batch_size)
    noise_key, self.noise_seed_source = noise_keys.secret_key(noise_seed)
    self.sampler_seed_source = noise_keys.seed_source(sampler_seed)
    self._inner = optax.chain(
        dp_transform.dp_aggregate(self.l2_norm_clip, plan.noise_multiplier,
                                  self.expected_batch_size, noise_key),
        optimizer)
    self._has_state = False
    # 128 bits shared by all processes (one run); load_state_dict adopts a
    # checkpoint's.
    self._run_nonce = noise_keys.agreed_entropy(4)
    self._run_id = self._run_id_of(self._run_nonce)
    self.tx = private_state.planned_transform(
        self._inner, num_steps=plan.num_steps, run_id=lambda: self._run_id,
        claim_init=self._claim_state)

  @property
  def num_steps(self) -> int:
    """The steps the budget pays for."""
    return self.plan.num_steps

  @property
  def noise_multiplier(self) -> float:
    """The calibrated sigma."""
    return self.plan.noise_multiplier

  def plan_fields(self) -> dict[str, Any]:
    """What a resumed run must share with the first: the accountant's inputs
    and what the noise is calibrated to."""
    return {'noise_multiplier': self.plan.noise_multiplier,
            'sampling_prob': self.plan.sampling_prob,
            'num_steps': self.plan.num_steps,
            'target_epsilon': self.target_epsilon, 'delta': self.delta,
            'accountant': self.accountant, 'l2_norm_clip': self.l2_norm_clip,
            'num_examples': self.sampler.num_examples,
            'expected_batch_size': self.expected_batch_size}

  def _run_id_of(self, nonce: np.ndarray) -> np.ndarray:
    """The run id of ``nonce`` under this plan: a state made under another
    plan (or a record whose plan was edited) does not match it."""
    text = json.dumps(self.plan_fields(), sort_keys=True)
    digest = hashlib.sha256(np.asarray(nonce, np.uint32).tobytes()
                            + text.encode()).digest()
    return np.frombuffer(digest[:16], np.uint32).copy()

  def _claim_state(self) -> None:
    if self._has_state:
      raise ValueError(
          'This setup already made (or restored) its optimizer state: a '
          'second one would reuse the noise key; keep threading that state, '
          'or call make_private again for a new run.')
    self._has_state = True

  def init(self, params: PyTree) -> PrivateState:
    """The run's one fresh optimizer state (host-side, once per setup).

    Raises:
      ValueError: on a second call, or under jit, eval_shape or vmap.
    """
    return self.tx.init(params)

  def abstract_state(self, params: PyTree) -> PrivateState:
    """Shapes and dtypes of the optimizer state, to restore a checkpoint
    into (no state is made, so nothing is counted)."""
    return jax.eval_shape(lambda p: private_state.initial_state(
        self._inner, p, self._run_id), params)

  def clipped_grad_sum(self, loss_fn: Callable[..., Any], *,
                       has_aux: bool = False,
                       microbatch_size: int | None = None,
                       clipper: Callable[..., Any] | None = None
                       ) -> Callable[..., Any]:
    """``(params, batch, *args) -> StepClippedSum`` for ``tx.update``.

    Each example's gradient of ``loss_fn(params, example, *args)`` clipped
    to ``l2_norm_clip`` and summed, padding rows contributing zero (the
    batch's own mask), with the batch's draw number and real-row count.

    Args:
      loss_fn: the loss of ONE example (or ``(loss, aux)``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; then the result
        is ``(StepClippedSum, aux)``.
      microbatch_size: examples per chunk (memory), None for one vmap.
      clipper: the low-level clipped sum to use, by default
        ``per_example.clipped_grad_sum``; e.g.
        ``one_pass_clipping.clipped_grad_sum`` for Flax models.
    """
    clip = (clipper or per_example.clipped_grad_sum)(
        loss_fn, self.l2_norm_clip, has_aux=has_aux,
        microbatch_size=microbatch_size)

    def of_batch(params, batch, *args):
      if not isinstance(batch, batch_iterator.SampledBatch):
        raise ValueError(f'setup.clipped_grad_sum takes a SampledBatch of '
                         f'setup.batches(...), got {type(batch).__name__}.')
      out = clip(params, batch.data, *args,
                 is_padding_example=jnp.asarray(batch.is_padding_example))
      clipped, aux = out if has_aux else (out, None)
      result = StepClippedSum(
          clipped, jnp.asarray(batch.step, jnp.int32),
          jnp.asarray(batch.num_real_examples, jnp.int32))
      return (result, aux) if has_aux else result

    return of_batch

  def batches(self, arrays: PyTree = None, *, source: Any = None,
              example_spec: PyTree = None) -> batch_iterator.PaddedBatches:
    """Padded Poisson batches of ``arrays`` (or ``source``) for the steps
    the sampler has left of the plan; see ``batch_iterator.PaddedBatches``."""
    return batch_iterator.PaddedBatches(self.sampler, self.num_steps,
                                        arrays=arrays, source=source,
                                        example_spec=example_spec)

  def steps_taken(self, opt_state: PyTree) -> int:
    """Noise draws so far, read from the ``PrivateState`` in ``opt_state``.

    Raises:
      ValueError: if the state is another run's (or plan's), or an update
        was refused as out of order or unmasked (the state and the sampler
        went apart).
    """
    state = private_state.find_private_state(opt_state)
    if not np.array_equal(np.asarray(state.run_id), self._run_id):
      raise ValueError(
          'This optimizer state is not this run\'s (another make_private '
          'call or another plan); resume a checkpoint with '
          'setup.load_state_dict(opt_state, record).')
    mismatched = int(state.refused_mismatched)
    if mismatched:
      raise ValueError(
          f'{mismatched} updates were refused because their batch was not '
          'the next draw of this state (a re-initialized state, or a sampler '
          'restored apart from it) or their sum was not masked: the epsilon '
          "of the run is not this state's; resume with "
          'setup.state_dict/load_state_dict.')
    steps = int(dp_transform.dp_state(state.inner).num_updates)
    if steps > min(self.num_steps, self.sampler.steps_sampled):
      raise ValueError(
          f'The optimizer state holds {steps} noise draws but this setup '
          f'drew {self.sampler.steps_sampled} of {self.num_steps} planned '
          'batches: it is not this run\'s state; restore it with '
          'setup.load_state_dict(opt_state, record).')
    return steps

  def accountant_at(self, opt_state: PyTree) -> accounting.PrivacyAccountant:
    """An accountant holding exactly the steps ``opt_state`` has taken."""
    record = accounting.PrivacyAccountant(self.accountant)
    record.compose(self.plan.noise_multiplier, self.plan.sampling_prob,
                   self.steps_taken(opt_state))
    return record

  def epsilon_spent(self, opt_state: PyTree) -> float:
    """Epsilon at ``delta`` of the updates ``opt_state`` has taken: exactly
    its ``num_updates`` steps of ``(sigma, q)`` (refused updates release
    nothing). Raises as :meth:`steps_taken`."""
    return self.accountant_at(opt_state).epsilon(self.delta)

  def report(self, opt_state: PyTree, privacy_unit: str = 'example'
             ) -> dict[str, Any]:
    """The run's ``privacy_report`` (recomputable with dp-accounting alone:
    ``privacy_report.recompute_epsilon``), with the updates refused past
    the plan."""
    state = private_state.find_private_state(opt_state)
    report = privacy_report.make_report(
        self.accountant_at(opt_state), dp=True, delta=self.delta,
        l2_norm_clip=self.l2_norm_clip,
        num_examples=self.sampler.num_examples,
        expected_batch_size=self.expected_batch_size,
        privacy_unit=privacy_unit,
        non_finite_examples_dropped=int(
            dp_transform.dp_state(state.inner).total_non_finite),
        target_epsilon=self.target_epsilon,
        noise_seed_source=self.noise_seed_source,
        sampler_seed_source=self.sampler_seed_source)
    report['updates_refused_past_plan'] = int(state.refused_past_plan)
    return report

  def state_dict(self, opt_state: PyTree) -> dict[str, Any]:
    """JSON-serializable record to save beside ``opt_state``: the run's
    nonce, the plan, the noise draws and the sampler state right after that
    many draws, so a checkpoint taken anywhere in the loop is consistent (a
    batch drawn but not yet used is drawn again on resume, with the same
    noise key). Keep it secret, as the optimizer state: its sampler state
    gives every past batch."""
    steps = self.steps_taken(opt_state)
    return {'run_nonce': self._run_nonce.tolist(),
            'plan': self.plan_fields(), 'num_updates': steps,
            'sampler': self.sampler.state_after(steps),
            'noise_seed_source': self.noise_seed_source,
            'sampler_seed_source': self.sampler_seed_source}

  def load_state_dict(self, opt_state: PyTree, record: dict[str, Any]
                      ) -> None:
    """Resumes from a restored ``opt_state`` and its :meth:`state_dict`.

    Call it on a fresh setup, before :meth:`init` and :meth:`batches`;
    this setup then continues the record's run (it adopts its run id) and
    ``opt_state`` is the run's state. Resume a checkpoint at most once (see
    the class docstring). The record's seed sources are trusted as saved:
    the report states them as the first run did.

    Raises:
      ValueError: naming the field, if the record's plan is not this
        setup's, the optimizer state is not of the record's run or step,
        or this setup already made a state or drew a batch.
    """
    mine = self.plan_fields()
    for name, value in mine.items():
      if record['plan'].get(name) != value:
        raise ValueError(
            f'The checkpoint was made with {name}={record["plan"].get(name)!r}'
            f' but this setup has {value!r}; a resumed run must follow the '
            'same plan: call make_private with the checkpoint\'s settings.')
    if self._has_state or self.sampler.steps_sampled:
      raise ValueError('load_state_dict must come before setup.init and '
                       'setup.batches; use a fresh make_private.')
    state = private_state.find_private_state(opt_state)
    steps = int(dp_transform.dp_state(state.inner).num_updates)
    nonce = np.asarray(record['run_nonce'], np.uint32)
    run_id = self._run_id_of(nonce)
    if (not np.array_equal(np.asarray(state.run_id), run_id)
        or int(state.refused_mismatched)
        or steps != record['num_updates']
        or record['sampler']['steps_sampled'] != steps):
      raise ValueError(
          f'The optimizer state ({steps} noise draws) is not the one this '
          f'record was saved with ({record["num_updates"]}, or another run); '
          'save both from one step with setup.state_dict(opt_state).')
    self.sampler.restore(record['sampler'])
    self._claim_state()
    self._run_nonce, self._run_id = nonce, run_id
    # The restored key and sampler state come from the first run's seeds.
    self.noise_seed_source = record['noise_seed_source']
    self.sampler_seed_source = record['sampler_seed_source']


def make_private(*, num_examples: int, expected_batch_size: float,
                 target_epsilon: float, delta: float, l2_norm_clip: float,
                 optimizer: optax.GradientTransformation,
                 epochs: float | None = None, steps: int | None = None,
                 noise_seed: int | None = None,
                 sampler_seed: int | None = None, accountant: str = 'pld',
                 padded_batch_size: int | None = None) -> PrivateSetup:
  """Calibrates DP-SGD to a target epsilon and returns the pieces of a run.

  Sigma is the smallest noise multiplier (to 0.1%) whose epsilon after all
  planned steps is at most ``target_epsilon`` (``accounting``; the noisier
  end of the bisection, so the target holds exactly, not approximately).

  >>> import jax, jax.numpy as jnp, numpy as np, optax
  >>> setup = make_private(num_examples=100, expected_batch_size=10,
  ...                      epochs=2, target_epsilon=2.0, delta=1e-5,
  ...                      l2_norm_clip=1.0, optimizer=optax.sgd(0.1),
  ...                      noise_seed=0, sampler_seed=0, accountant='rdp')
  >>> setup.num_steps, round(setup.noise_multiplier, 2)
  (20, 1.48)
  >>> loss = lambda params, x: jnp.sum((params['w'] - x) ** 2)  # ONE example
  >>> grad_sum = setup.clipped_grad_sum(loss)
  >>> @jax.jit
  ... def step(params, opt_state, batch):
  ...   updates, opt_state = setup.tx.update(grad_sum(params, batch),
  ...                                        opt_state, params)
  ...   return optax.apply_updates(params, updates), opt_state
  >>> params = {'w': jnp.zeros(3)}
  >>> opt_state = setup.init(params)
  >>> for batch in setup.batches(np.ones((100, 3), np.float32)):
  ...   params, opt_state = step(params, opt_state, batch)
  >>> setup.steps_taken(opt_state), setup.epsilon_spent(opt_state) <= 2.0
  (20, True)

  Args:
    num_examples: size of the private training set (public).
    expected_batch_size: ``q * num_examples``, in (0, num_examples].
    target_epsilon: the budget, > 0; never exceeded by the planned steps.
    delta: target delta, in (0, 1 / num_examples): a delta of 1/n allows
      publishing one example outright.
    l2_norm_clip: the per-example clip norm ``C``.
    optimizer: the optax optimizer that follows ``dp_aggregate``.
    epochs: passes over the data (steps = round(epochs / q)); or
    steps: the number of steps. Exactly one of the two.
    noise_seed: seed of the noise key, or None for OS entropy (secret).
      A seed makes the noise reproducible and is reported as not secret.
    sampler_seed: seed of the Poisson sampler, or None for OS entropy.
    accountant: ``'pld'`` (tight, default) or ``'rdp'``.
    padded_batch_size: the sampler's chunk size (default: its 99.9%
      quantile of the batch size, a multiple of 8).

  Returns:
    The :class:`PrivateSetup`.

  Raises:
    ValueError: naming the value, for a bad argument or a budget that
      cannot pay for the steps.
  """
  if (epochs is None) == (steps is None):
    raise ValueError(f'Give exactly one of epochs and steps, got '
                     f'epochs={epochs!r}, steps={steps!r}.')
  if not target_epsilon > 0:
    raise ValueError(f'target_epsilon must be > 0, got {target_epsilon!r}; '
                     'for a non-private run use the optimizer alone.')
  if isinstance(num_examples, bool) or not isinstance(
      num_examples, numbers.Integral) or num_examples < 1:
    raise ValueError(
        f'num_examples must be a positive int, got {num_examples!r}.')
  if not 0 < delta < 1 / num_examples:
    raise ValueError(
        f'delta={delta!r} must be in (0, 1/num_examples = '
        f'{1 / num_examples:.3g}): a delta of 1/n allows publishing one '
        'example outright; use delta well below it (e.g. 1e-5).')
  if not 0 < expected_batch_size <= num_examples:
    raise ValueError(
        f'expected_batch_size must be in (0, num_examples={num_examples}], '
        f'got {expected_batch_size!r}.')
  q = expected_batch_size / num_examples
  if steps is None:
    if not epochs > 0:
      raise ValueError(f'epochs must be > 0, got {epochs!r}.')
    plan = privacy_plan.plan_privacy(
        num_examples=num_examples, expected_batch_size=expected_batch_size,
        num_epochs=epochs, dp=True, noise_multiplier=None,
        target_epsilon=target_epsilon, delta=delta, accountant=accountant)
  else:
    if isinstance(steps, bool) or not isinstance(
        steps, numbers.Integral) or steps < 1:
      raise ValueError(f'steps must be a positive int, got {steps!r}.')
    steps = int(steps)
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon, delta, q, steps, accountant)
    plan = privacy_plan.PrivacyPlan(sigma, q, steps, steps)
  return PrivateSetup(
      optimizer=optimizer, plan=plan, delta=delta,
      target_epsilon=target_epsilon, l2_norm_clip=l2_norm_clip,
      expected_batch_size=expected_batch_size, accountant=accountant,
      num_examples=int(num_examples), noise_seed=noise_seed,
      sampler_seed=sampler_seed, padded_batch_size=padded_batch_size)
