"""Privacy accounting for Poisson-sampled DP-SGD, built on dp-accounting.

What is accounted: each DP-SGD step is a Gaussian mechanism with noise
multiplier ``sigma`` on a clipped sum of sensitivity ``C`` (see
``dp_transform``), applied to a Poisson sample with rate ``q``; ``T`` steps are
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``.
Phases with other ``(sigma, q)`` on the same data (e.g. pre-training) are
composed into the same ``ComposedDpEvent``. Adjacency: add or remove one
example (one image in dplh-jax).

Two accountants: ``'pld'`` (privacy loss distributions, tight; the default)
and ``'rdp'`` (Renyi DP, an upper bound that is looser but fast).
"""

import dataclasses
import functools
import json
import math
import operator
from typing import Any, Callable, Sequence

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib

ACCOUNTANTS = ('pld', 'rdp')

# dp-accounting's default PLD discretization; recorded with every accountant
# so an epsilon can be recomputed with the same setting.
PLD_DISCRETIZATION = 1e-4

_NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# Rough upper end for the noise multiplier search: an epsilon that needs more
# noise than this is not a useful training run.
_MAX_NOISE_MULTIPLIER = 1e4


def _check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(
        f'Unknown accountant {accountant!r}; use one of {ACCOUNTANTS}.')


def _check_delta(delta: float) -> None:
  if not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta!r}.')


@dataclasses.dataclass(frozen=True)
class Phase:
  """``steps`` Poisson-sampled Gaussian steps with one ``(sigma, q)``.

  ``name`` labels the phase (e.g. ``'detection_pretrain'``) in records and
  reports; it does not enter the epsilon. ``''`` (the default) is an
  unnamed phase, as in records written before phases had names.
  """

  noise_multiplier: float
  sampling_prob: float
  steps: int
  name: str = ''

  def __post_init__(self):
    if not self.noise_multiplier >= 0:
      raise ValueError(
          f'noise_multiplier must be >= 0, got {self.noise_multiplier!r}.')
    if not 0 <= self.sampling_prob <= 1:
      raise ValueError(
          f'sampling_prob must be in [0, 1], got {self.sampling_prob!r}.')
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or (
        self.steps < 0):
      raise ValueError(f'steps must be an int >= 0, got {self.steps!r}.')
    if not isinstance(self.name, str):
      raise ValueError(f'name must be a str, got {self.name!r}.')

  def to_dict(self) -> dict[str, Any]:
    """The record of the phase; an unnamed one has no ``name`` key, so
    records of runs without named phases are what they always were."""
    record = dataclasses.asdict(self)
    if not self.name:
      del record['name']
    return record

  def dp_event(self) -> dp_accounting.DpEvent:
    step = dp_accounting.PoissonSampledDpEvent(
        self.sampling_prob, dp_accounting.GaussianDpEvent(self.noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, self.steps)


@functools.lru_cache(maxsize=256)
def _one_step_pld(noise_multiplier: float, sampling_prob: float):
  """PLD of one Poisson-subsampled Gaussian step, built as PLDAccountant does.

  Building it is the slow part of PLD accounting (seconds at large q), and a
  run asks for the epsilon of the same (sigma, q) at every log step, so it is
  built once per (sigma, q). PLD objects are immutable.
  """
  return pld_lib.from_gaussian_mechanism(
      standard_deviation=noise_multiplier,
      value_discretization_interval=PLD_DISCRETIZATION,
      sampling_prob=sampling_prob,
      neighboring_relation=_NEIGHBORING_RELATION)


def _pld_epsilon(phases: Sequence[Phase], delta: float) -> float:
  """The same computation as ``PLDAccountant`` on the ComposedDpEvent of the
  phases (identity, then compose each phase's self-composition), reusing the
  cached one-step PLDs; the result is bit-identical."""
  total = pld_lib.identity(value_discretization_interval=PLD_DISCRETIZATION)
  for phase in phases:
    total = total.compose(_one_step_pld(
        phase.noise_multiplier, phase.sampling_prob).self_compose(phase.steps))
  return float(total.get_epsilon_for_delta(delta))


def _epsilon_of_phases(phases: Sequence[Phase], delta: float,
                       accountant: str) -> float:
  _check_delta(delta)
  _check_accountant(accountant)
  phases = [p for p in phases if p.steps > 0 and p.sampling_prob > 0]
  if not phases:
    return 0.0
  if any(p.noise_multiplier == 0 for p in phases):
    return math.inf
  if accountant == 'pld':
    return _pld_epsilon(phases, delta)
  acc = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=_NEIGHBORING_RELATION)
  acc.compose(dp_accounting.ComposedDpEvent([p.dp_event() for p in phases]))
  return float(acc.get_epsilon(delta))


# Steps planned at one (sigma, q): a count, or (phase name, count) pairs of
# consecutive phases (e.g. pre-training, then the main run), each recorded
# as its own phase.
PlannedSteps = int | Sequence[tuple[str, int]]


def _planned_phases(noise_multiplier: float, sampling_prob: float,
                    steps: PlannedSteps, minimum: int = 0) -> list[Phase]:
  """The non-empty phases ``steps`` plans, in order (as :meth:`compose`
  records them: zero steps record nothing); raises unless they hold at least
  ``minimum`` steps."""
  try:
    pairs = [('', steps)] if hasattr(steps, '__index__') else [
        (name, count if isinstance(count, bool) else operator.index(count))
        for name, count in steps]
  except (TypeError, ValueError) as error:  # not pairs, or not int counts
    raise ValueError(f'steps must be an int or (name, steps) pairs, got '
                     f'{steps!r}.') from error
  phases = [Phase(noise_multiplier, sampling_prob, count, name)
            for name, count in pairs]
  if sum(p.steps for p in phases) < minimum:
    raise ValueError(f'steps must plan at least {minimum} step(s), got '
                     f'{steps!r}.')
  return [p for p in phases if p.steps]


def _with_composed(phases: Sequence[Phase], new: Phase) -> list[Phase]:
  """``phases`` then ``new``, merged into the last phase when it has the same
  (sigma, q, name): what :meth:`PrivacyAccountant.compose` records."""
  phases = list(phases)
  last = phases[-1] if phases else None
  if last and (last.noise_multiplier, last.sampling_prob, last.name) == (
      new.noise_multiplier, new.sampling_prob, new.name):
    phases[-1] = dataclasses.replace(last, steps=last.steps + new.steps)
  else:
    phases.append(new)
  return phases


def epsilon(noise_multiplier: float, sampling_prob: float, steps: int,
            delta: float, accountant: str = 'pld') -> float:
  """Epsilon of ``steps`` Poisson-sampled Gaussian steps at the given delta.

  >>> round(epsilon(3.0, 0.1, 512, 1e-6, accountant='rdp'), 3)
  4.051

  Args:
    noise_multiplier: Noise std divided by the clipping norm, ``sigma``.
    sampling_prob: Poisson sampling rate ``q``.
    steps: Number of steps.
    delta: Target delta.
    accountant: ``'pld'`` or ``'rdp'``.

  Returns:
    Epsilon; 0 for no steps, inf for zero noise.
  """
  return _epsilon_of_phases(
      [Phase(noise_multiplier, sampling_prob, steps)], delta, accountant)


def _bisect_noise(epsilon_at: Callable[[float], float], target_epsilon: float,
                  rtol: float) -> float:
  """Smallest sigma (to ``rtol``) with ``epsilon_at(sigma) <= target``.

  Epsilon decreases in sigma. The bracket starts at sigma = 1 and grows or
  shrinks by factors of 2, so the search never evaluates the tiny sigmas
  where PLD is slow unless the target needs them.
  """
  low, high = 1.0, 1.0
  if epsilon_at(1.0) > target_epsilon:
    high = 2.0
    while epsilon_at(high) > target_epsilon:
      low, high = high, high * 2
      if high > _MAX_NOISE_MULTIPLIER:
        raise ValueError(
            f'target_epsilon={target_epsilon} needs noise_multiplier > '
            f'{_MAX_NOISE_MULTIPLIER:g}; raise the budget or lower q/steps.')
  else:
    low = 0.5
    while epsilon_at(low) <= target_epsilon:
      high, low = low, low / 2
      if low < 1e-3:
        return high
  return bisect(lambda sigma: epsilon_at(sigma) <= target_epsilon,
                failing=low, passing=high,
                midpoint=lambda a, b: math.sqrt(a * b),
                converged=lambda a, b: max(a, b) / min(a, b) <= 1 + rtol)


def bisect(fits: Callable[[Any], bool], *, failing: Any, passing: Any,
           midpoint: Callable[[Any, Any], Any],
           converged: Callable[[Any, Any], bool]) -> Any:
  """The passing end of a bracket narrowed around a monotone ``fits``.

  ``fits(passing)`` holds and ``fits(failing)`` does not (the caller's
  bracket); either may be the larger. The result always fits, so a budget
  search built on it never returns a value past its target.
  """
  while not converged(failing, passing):
    mid = midpoint(failing, passing)
    if fits(mid):
      passing = mid
    else:
      failing = mid
  return passing


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, sampling_prob: float,
    steps: PlannedSteps, accountant: str = 'pld', rtol: float = 1e-3,
    prior_phases: Sequence[Phase] = ()) -> float:
  """The smallest noise multiplier whose epsilon is at most the target.

  The result is the upper end of a bisection bracket, so
  ``epsilon(result, ...) <= target_epsilon`` always holds; the bracket is
  ``rtol`` wide in sigma.

  Args:
    target_epsilon: Budget, > 0.
    delta: Target delta.
    sampling_prob: Poisson sampling rate ``q``, in (0, 1].
    steps: Number of steps planned, >= 1; or ``(name, steps)`` pairs of
      consecutive phases at the one sigma (e.g. pre-training, then the main
      run), accounted as the separate phases they will be recorded as.
    accountant: ``'pld'`` or ``'rdp'``.
    rtol: Relative width of the final sigma bracket, in [1e-9, 1).
    prior_phases: Phases already spent on the same data (e.g. pre-training);
      the budget covers them and the new steps together.

  Returns:
    The noise multiplier ``sigma``.
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise ValueError(
        f'target_epsilon must be finite and > 0, got {target_epsilon!r}.')
  _planned_phases(1.0, 0.0, steps, minimum=1)  # validates steps
  if not 0 < sampling_prob <= 1:
    raise ValueError(
        f'sampling_prob must be in (0, 1], got {sampling_prob!r}.')
  if not 1e-9 <= rtol < 1:
    raise ValueError(f'rtol must be in [1e-9, 1), got {rtol!r}.')
  _check_delta(delta)
  _check_accountant(accountant)
  prior = list(prior_phases)
  if _epsilon_of_phases(prior, delta, accountant) >= target_epsilon:
    raise ValueError(f'Earlier phases already spend target_epsilon='
                     f'{target_epsilon}; nothing is left for new steps.')
  def epsilon_at(sigma: float) -> float:
    phases = prior
    for phase in _planned_phases(sigma, sampling_prob, steps):
      phases = _with_composed(phases, phase)
    return _epsilon_of_phases(phases, delta, accountant)

  return _bisect_noise(epsilon_at, target_epsilon, rtol)


class PrivacyAccountant:
  """Records every phase that touched the private data, and its epsilon.

  Consecutive calls of :meth:`compose` with the same ``(sigma, q)`` extend one
  phase, so per-step composition stays compact. The record serializes to JSON
  and restores to the same epsilon: a report made from it can be recomputed
  with dp-accounting alone.

  >>> acc = PrivacyAccountant('rdp')
  >>> acc.compose(noise_multiplier=2.0, sampling_prob=0.01, steps=100)  # pre-training
  >>> acc.compose(noise_multiplier=1.0, sampling_prob=0.02, steps=50)
  >>> acc.steps
  150
  >>> restored = PrivacyAccountant.from_json(acc.to_json())
  >>> restored.epsilon(1e-5) == acc.epsilon(1e-5)
  True
  """

  def __init__(self, accountant: str = 'pld', phases: Sequence[Phase] = ()):
    _check_accountant(accountant)
    self.accountant = accountant
    self._phases = list(phases)

  @property
  def phases(self) -> tuple[Phase, ...]:
    return tuple(self._phases)

  @property
  def steps(self) -> int:
    """Total steps composed over all phases."""
    return sum(p.steps for p in self._phases)

  def compose(self, noise_multiplier: float, sampling_prob: float,
              steps: int = 1, name: str = '') -> None:
    """Records ``steps`` more Poisson-sampled Gaussian steps.

    They extend the last phase if it has the same ``(sigma, q, name)``, else
    start a phase of their own: steps of two named phases never merge, even
    at the same (sigma, q). Zero steps record nothing (they release nothing,
    and dp-accounting cannot compose an event zero times).
    """
    phase = Phase(float(noise_multiplier), float(sampling_prob),
                  operator.index(steps), name)
    if phase.steps:
      self._phases = _with_composed(self._phases, phase)

  def epsilon(self, delta: float) -> float:
    """Epsilon of everything composed so far, at ``delta``."""
    return _epsilon_of_phases(self._phases, delta, self.accountant)

  def calibrate_noise_multiplier(self, target_epsilon: float, delta: float,
                                 sampling_prob: float,
                                 steps: PlannedSteps) -> float:
    """Smallest sigma such that ``steps`` more steps (a count, or ``(name,
    steps)`` pairs) keep the total epsilon, earlier phases included, within
    ``target_epsilon``."""
    return calibrate_noise_multiplier(
        target_epsilon, delta, sampling_prob, steps, self.accountant,
        prior_phases=self._phases)

  def epsilon_after(self, delta: float, noise_multiplier: float,
                    sampling_prob: float, steps: PlannedSteps) -> float:
    """Epsilon if ``steps`` more steps (a count, or ``(name, steps)`` pairs
    of consecutive phases) were composed; nothing is recorded."""
    planned = PrivacyAccountant(self.accountant, self._phases)
    for phase in _planned_phases(noise_multiplier, sampling_prob, steps):
      planned.compose(phase.noise_multiplier, phase.sampling_prob,
                      phase.steps, phase.name)
    return planned.epsilon(delta)

  def to_dict(self) -> dict[str, Any]:
    return {'accountant': self.accountant,
            'pld_discretization': PLD_DISCRETIZATION,
            'phases': [p.to_dict() for p in self._phases]}

  @classmethod
  def from_dict(cls, record: dict[str, Any]) -> 'PrivacyAccountant':
    if record.get('pld_discretization', PLD_DISCRETIZATION) != (
        PLD_DISCRETIZATION):
      raise ValueError(f'Record used PLD discretization '
                       f'{record["pld_discretization"]}, this version uses '
                       f'{PLD_DISCRETIZATION}.')
    return cls(record['accountant'], [Phase(**p) for p in record['phases']])

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> 'PrivacyAccountant':
    return cls.from_dict(json.loads(text))
