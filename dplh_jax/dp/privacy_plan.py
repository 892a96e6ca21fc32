"""The privacy plan of a run: noise multiplier, sampling rate and step count.

Before the first step, a run fixes what the accountant will be told and
checks it against the budget, so a target epsilon is never exceeded
(docs/DESIGN.md, Privacy rules 2 and 6):

* ``target_epsilon`` alone: sigma is calibrated so the planned steps spend at
  most the target;
* ``noise_multiplier`` alone: the planned steps run and their epsilon is
  reported;
* both: the run stops at the last step whose epsilon stays within the target.

Phases already spent on the same data (``spent``) count against the budget.

A run may begin with a pre-training phase on the same private data
(``pretrain_epochs``; DPLH's detection pre-training): its steps are planned
from their epochs like the main ones, at the same q, and one sigma is
calibrated (or one step count cut) over all of them, accounted as the two
named phases they are recorded as, so the target covers both.
"""

from __future__ import annotations

import dataclasses

from dplh_jax.dp import accounting


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """What the accountant will be told: sigma, q and the number of steps.

  Attributes:
    noise_multiplier: sigma (0 for a non-private run).
    sampling_prob: Poisson rate ``q = expected_batch_size / num_examples``.
    num_steps: steps to run.
    requested_steps: steps the epochs asked for; more than ``num_steps`` when
      the budget cut the run short.
    pretrain_steps: how many of the first steps pre-train (0: none), counted
      in ``num_steps`` and ``requested_steps``; a budget cut may end the run
      before they are all done.
    pretrain_phase: the accountant's name for the pre-training steps.
    main_phase: its name for the others (``''`` when nothing pre-trains,
      as in runs without pre-training).
  """
  noise_multiplier: float
  sampling_prob: float
  num_steps: int
  requested_steps: int
  pretrain_steps: int = 0
  pretrain_phase: str = ''
  main_phase: str = ''

  def phase_of_step(self, step: int) -> str:
    """The accountant's phase name of step ``step`` (0-based)."""
    return self.pretrain_phase if step < self.pretrain_steps else (
        self.main_phase)

  def phase_steps(self, start: int, stop: int) -> list[tuple[str, int]]:
    """``(name, steps)`` of steps ``[start, stop)`` of the plan, in order,
    without empty phases: what the accountant composes for them."""
    split = min(max(self.pretrain_steps, start), stop)
    pairs = [(self.pretrain_phase, split - start),
             (self.main_phase, stop - split)]
    return [(name, steps) for name, steps in pairs if steps > 0]


def plan_privacy(*, num_examples: int, expected_batch_size: float,
                 num_epochs: float, dp: bool,
                 noise_multiplier: float | None,
                 target_epsilon: float | None, delta: float,
                 accountant: str = 'pld',
                 spent: accounting.PrivacyAccountant | None = None,
                 pretrain_epochs: float = 0.0,
                 phase_names: tuple[str, str] = ('pretrain', 'main')
                 ) -> PrivacyPlan:
  """Noise multiplier and step count honouring the budget.

  Args:
    num_examples: private training examples (public size of the dataset).
    expected_batch_size: ``q * num_examples``.
    num_epochs: passes over the data the run asks for.
    dp: False for a non-private run (sigma 0, no budget).
    noise_multiplier: sigma, or None to calibrate it to ``target_epsilon``.
    target_epsilon: the budget, or None to report whatever the steps spend.
    delta: target delta.
    accountant: ``'pld'`` or ``'rdp'``.
    spent: phases already composed on the same data (e.g. pre-training).
    pretrain_epochs: passes over the data of a pre-training phase run first,
      at the same q and sigma (0: none).
    phase_names: the accountant's names of the pre-training and the main
      phase, used only when ``pretrain_epochs`` > 0.

  Raises:
    ValueError: naming the value, if q > 1, pretrain_epochs < 0 or the
      budget cannot pay for a single step.
  """
  q = expected_batch_size / num_examples
  if q > 1:
    raise ValueError(
        f'expected_batch_size={expected_batch_size} exceeds the '
        f'{num_examples} training examples: sampling rate q={q:.4g} > 1.')
  if not 0 <= pretrain_epochs < float('inf'):
    raise ValueError(f'pretrain_epochs={pretrain_epochs} must be finite and '
                     '>= 0 (0: no pre-training).')
  pretrain = max(1, round(pretrain_epochs / q)) if pretrain_epochs > 0 else 0
  requested = pretrain + max(1, round(num_epochs / q))
  names = phase_names if pretrain else ('', '')
  def plan(sigma: float, steps: int) -> PrivacyPlan:
    return PrivacyPlan(sigma, q, steps, requested, pretrain, *names)

  if not dp:
    return plan(0.0, requested)
  spent = spent or accounting.PrivacyAccountant(accountant)
  sigma, planned = noise_multiplier, requested
  if sigma is None:
    if target_epsilon is None:
      raise ValueError('Give target_epsilon or noise_multiplier for DP.')
    sigma = spent.calibrate_noise_multiplier(
        target_epsilon, delta, q, plan(1.0, requested).phase_steps(
            0, requested))
  elif target_epsilon is not None:
    planned = steps_within_budget(spent, sigma, q, requested, delta,
                                  target_epsilon,
                                  plan(sigma, requested).phase_steps)
  return plan(sigma, planned)


def steps_within_budget(spent: accounting.PrivacyAccountant, sigma: float,
                        q: float, max_steps: int, delta: float,
                        target_epsilon: float, phase_steps=None) -> int:
  """Largest step count <= ``max_steps`` whose epsilon (after ``spent``)
  stays within ``target_epsilon``.

  ``phase_steps(0, steps)`` (``PrivacyPlan.phase_steps``), if given, names
  the phases the first ``steps`` steps are recorded as; the epsilon is that
  of those phases.
  """
  def fits(steps: int) -> bool:
    planned = steps if phase_steps is None else phase_steps(0, steps)
    return spent.epsilon_after(delta, sigma, q, planned) <= target_epsilon

  if not fits(1):
    raise ValueError(
        f'target_epsilon={target_epsilon} cannot pay for one step at '
        f'noise_multiplier={sigma}, q={q:.4g}, delta={delta}.')
  if fits(max_steps):
    return max_steps
  return accounting.bisect(fits, failing=max_steps, passing=1,
                           midpoint=lambda a, b: (a + b) // 2,
                           converged=lambda a, b: abs(a - b) <= 1)
