"""The privacy report of a run: what was spent, and everything to recompute it.

``privacy_report.json`` carries the epsilon and every parameter the
accountant composed, so a reader can recompute the epsilon with dp-accounting
alone (see :func:`recompute_epsilon`) instead of trusting this package.

What the epsilon covers: the released parameters (every noisy update) and
anything computed from them alone. It does not cover values computed from
the private data without noise, which a run still publishes for monitoring;
the report lists them under ``not_covered_by_the_guarantee``
(:data:`NOT_COVERED`), and docs/DESIGN.md ("What the guarantee does not
cover") says why each is there. Share them as you would the data.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

import dp_accounting

from dplh_jax.dp import accounting

# Published values computed from private data without noise.
NOT_COVERED = (
    'metrics.jsonl train lines: train_loss_* (per-task losses on the sampled '
    'batch), clipped_fraction, non_finite_examples, realized_batch_size '
    '(the Poisson sample\'s size), steps_per_second',
    'this report: non_finite_examples_dropped',
    'timings of steps (the step time varies with the realized batch size)',
)


def make_report(accountant: accounting.PrivacyAccountant, *, dp: bool,
                delta: float,
                l2_norm_clip: float, num_examples: int,
                expected_batch_size: float, privacy_unit: str,
                non_finite_examples_dropped: int,
                target_epsilon: float | None, noise_seed_source: str,
                sampler_seed_source: str, num_devices: int = 1,
                num_processes: int = 1,
                initialization: str = 'random') -> dict[str, Any]:
  """Assembles the report of a finished (or interrupted) run.

  ``num_devices`` and ``num_processes`` record where the run trained (the
  last run into the workdir, for a resumed one). They do not enter the
  epsilon: data-parallel steps release the same mechanism, the noise added
  once to the sum over all devices.

  ``initialization`` says where the initial parameters came from. The
  epsilon charges nothing for them, so they must not depend on the private
  data (random, or trained on public data only).

  ``noise_multiplier``, ``sampling_prob`` and ``steps`` describe the main
  phase (the last one; sigma and q are None before the first step);
  ``phases`` lists every phase composed, pre-training included (each with its ``name`` when it has one, e.g.
  ``detection_pretrain`` then ``hyperface``; the name does not enter the
  epsilon), and ``epsilon`` covers all of them. A non-private run has no
  guarantee: its ``epsilon`` is None (JSON null), never 0, which would claim
  perfect privacy.
  """
  if not dp:
    return {'dp': False, 'epsilon': None, 'delta': None,
            'privacy_unit': 'none (non-private)',
            'num_examples': num_examples,
            'num_devices': num_devices, 'num_processes': num_processes,
            'initialization': initialization,
            'not_covered_by_the_guarantee': ['everything: not trained with DP']}
  phases = accountant.phases
  # Before the first step no phase exists: None, not a sigma of 0 (no noise).
  last = phases[-1] if phases else None
  return {
      'dp': True,
      'epsilon': accountant.epsilon(delta),
      'delta': delta,
      'accountant': accountant.accountant,
      'noise_multiplier': None if last is None else last.noise_multiplier,
      'sampling_prob': None if last is None else last.sampling_prob,
      'steps': accountant.steps,
      'phases': accountant.to_dict()['phases'],
      'l2_norm_clip': l2_norm_clip,
      'privacy_unit': privacy_unit,
      'num_examples': num_examples,
      'expected_batch_size': expected_batch_size,
      'sampling_method': 'poisson',
      'neighboring_relation': 'add_or_remove_one',
      'non_finite_examples_dropped': non_finite_examples_dropped,
      'not_covered_by_the_guarantee': list(NOT_COVERED),
      'target_epsilon': target_epsilon,
      'noise_seed_source': noise_seed_source,
      'sampler_seed_source': sampler_seed_source,
      'dp_accounting_version': importlib.metadata.version('dp-accounting'),
      'num_devices': num_devices,
      'num_processes': num_processes,
      'initialization': initialization,
  }


def recompute_epsilon(report: dict[str, Any]) -> float:
  """Epsilon from the report's own fields, with dp-accounting only.

  Each phase is its own ``SelfComposedDpEvent``, in the report's order, as
  the accountant composed them (phase names are labels only); a phase of
  zero steps releases nothing and is skipped. Each phase is checked as the
  accountant checks its own (an int ``steps`` >= 0, sigma >= 0, q in [0, 1]),
  so an edited report raises instead of giving another epsilon.

  >>> report = {'accountant': 'rdp', 'delta': 1e-6, 'phases': [
  ...     {'noise_multiplier': 3.0, 'sampling_prob': 0.1, 'steps': 512}]}
  >>> round(recompute_epsilon(report), 3)
  4.051
  """
  phases = [accounting.Phase(**p) for p in report['phases']]  # checks each
  events = [p.dp_event() for p in phases if p.steps]
  if report['accountant'] == 'pld':
    acc = dp_accounting.pld.PLDAccountant()
  else:
    acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.ComposedDpEvent(events))
  return float(acc.get_epsilon(report['delta']))


def write_report(report: dict[str, Any], path: str) -> None:
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
    f.write('\n')
