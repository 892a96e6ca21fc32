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
  """
  noise_multiplier: float
  sampling_prob: float
  num_steps: int
  requested_steps: int


def plan_privacy(*, num_examples: int, expected_batch_size: float,
                 num_epochs: float, dp: bool,
                 noise_multiplier: float | None,
                 target_epsilon: float | None, delta: float,
                 accountant: str = 'pld',
                 spent: accounting.PrivacyAccountant | None = None
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

  Raises:
    ValueError: naming the value, if q > 1 or the budget cannot pay for a
      single step.
  """
  q = expected_batch_size / num_examples
  if q > 1:
    raise ValueError(
        f'expected_batch_size={expected_batch_size} exceeds the '
        f'{num_examples} training examples: sampling rate q={q:.4g} > 1.')
  requested = max(1, round(num_epochs / q))
  if not dp:
    return PrivacyPlan(0.0, q, requested, requested)
  spent = spent or accounting.PrivacyAccountant(accountant)
  sigma, planned = noise_multiplier, requested
  if sigma is None:
    if target_epsilon is None:
      raise ValueError('Give target_epsilon or noise_multiplier for DP.')
    sigma = spent.calibrate_noise_multiplier(target_epsilon, delta, q,
                                             requested)
  elif target_epsilon is not None:
    planned = steps_within_budget(spent, sigma, q, requested, delta,
                                  target_epsilon)
  return PrivacyPlan(sigma, q, planned, requested)


def steps_within_budget(spent: accounting.PrivacyAccountant, sigma: float,
                        q: float, max_steps: int, delta: float,
                        target_epsilon: float) -> int:
  """Largest step count <= ``max_steps`` whose epsilon (after ``spent``)
  stays within ``target_epsilon``."""
  def fits(steps: int) -> bool:
    return spent.epsilon_after(delta, sigma, q, steps) <= target_epsilon

  if not fits(1):
    raise ValueError(
        f'target_epsilon={target_epsilon} cannot pay for one step at '
        f'noise_multiplier={sigma}, q={q:.4g}, delta={delta}.')
  if fits(max_steps):
    return max_steps
  return accounting.bisect(fits, failing=max_steps, passing=1,
                           midpoint=lambda a, b: (a + b) // 2,
                           converged=lambda a, b: abs(a - b) <= 1)
