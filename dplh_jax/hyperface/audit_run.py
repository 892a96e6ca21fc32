"""Empirical privacy audit: one-run canary audit and loss-threshold MIA.

  dplh-audit --config audit_dp --workdir workdirs/audit_dp \
      [--num_canaries=200 --json_out=...]

One training run (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one
(1) training run"):

1. Renders m canaries (``canaries.py``) and flips a fair coin per canary (a
   seeded NumPy generator; the coins are recorded): heads, it joins the
   training set.
2. Trains once through ``train.train_and_evaluate``, main.py's code path, on
   the real training images plus the included canaries; the privacy report
   therefore counts the canaries among the examples.
3. Scores every canary by losses only (black box): its loss under decoy
   labels minus its loss under its own labels (``calibrated_scores``).
   Guesses "included" for the k highest scores and "excluded" for the k
   lowest, abstains on the rest, and turns the number of correct guesses
   into ``audit.epsilon_lower_bound`` (delta = 0).
4. Runs the loss-threshold membership inference on ordinary training images
   against held-out test images.

Everything goes to ``--json_out`` (default ``workdir/audit.json``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dplh_jax.dp import audit
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train
from dplh_jax.hyperface import canaries as canaries_lib

@functools.lru_cache(maxsize=2)
def _compiled_losses(model: models.HyperFace, weighting):
  loss_fn = functools.partial(losses.per_image_loss, rng=None, model=model,
                              weighting=weighting)
  return jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)))


def per_image_losses(config: ml_collections.ConfigDict, params,
                     records: Sequence[dict[str, Any]],
                     pipeline_config: input_pipeline.PipelineConfig,
                     num_draws: int) -> dict[str, np.ndarray]:
  """Deterministic losses of each record, averaged over proposal draws.

  Returns:
    ``{'total': (n,), task: (n,) ...}``: the weighted training loss and the
    five task losses of every record, each averaged over ``num_draws``
    evaluation proposal sets (no flips, no dropout).
  """
  model, weighting = model_setup.build_model(config)
  compute = _compiled_losses(model, weighting)
  sums: dict[str, np.ndarray] = {}
  for draw in range(num_draws):
    parts: dict[str, list] = {}
    for batch in input_pipeline.eval_batches(
        records, pipeline_config, batch_size=config.eval_batch_size,
        seed=config.seed + 1000 * draw):
      total, aux = jax.device_get(compute(params, batch))
      real = ~batch['is_padding_example']
      for name, value in {'total': total, **aux['task_losses']}.items():
        parts.setdefault(name, []).append(np.asarray(value)[real])
    for name, chunks in parts.items():
      sums[name] = sums.get(name, 0.0) + np.concatenate(chunks)
  return {name: value / num_draws for name, value in sums.items()}


def calibrated_scores(config: ml_collections.ConfigDict, params,
                      canaries: Sequence[Sequence[dict[str, Any]]],
                      pipeline_config: input_pipeline.PipelineConfig,
                      num_draws: int) -> tuple[np.ndarray, dict]:
  """Per canary: mean loss under its decoy labels minus under its own.

  Black box (losses only). Higher = the model fits this canary's own labels
  better than equally likely labels it never saw, i.e. looks included. The
  decoys remove what the raw loss mixes in: how far the model's output for
  this image happens to lie from every label of its kind.

  Args:
    config: the run's config (model, eval batch size, seed).
    params: trained variables.
    canaries: ``make_canary`` lists ``[canary, decoy_0, ...]``, all of one
      length; decoys of canary i are scored at position i, so with exactly
      the canary's proposal crops.
    pipeline_config: how images become examples.
    num_draws: proposal draws averaged per loss.

  Returns:
    ``(scores (m,), {'canary_loss': {task: (m,)}, 'decoy_loss': {task:
    (m,)}})``, task losses including ``'total'``; decoy losses are means over
    decoys.
  """
  num_decoys = len(canaries[0]) - 1
  if num_decoys < 1 or any(len(c) != num_decoys + 1 for c in canaries):
    raise ValueError('every canary needs the same number (>= 1) of decoys.')
  own = per_image_losses(config, params, [c[0] for c in canaries],
                         pipeline_config, num_draws)
  decoy: dict[str, np.ndarray] = {}
  for r in range(1, num_decoys + 1):
    for name, values in per_image_losses(
        config, params, [c[r] for c in canaries], pipeline_config,
        num_draws).items():
      decoy[name] = decoy.get(name, 0.0) + values / num_decoys
  return decoy['total'] - own['total'], {'canary_loss': own,
                                         'decoy_loss': decoy}


def _rounded(values: np.ndarray) -> list[float]:
  return [round(float(v), 5) for v in values]


def _auc(scores: np.ndarray, included: np.ndarray) -> float | None:
  """P[an included canary outscores an excluded one] (diagnostic only)."""
  if included.all() or not included.any():
    return None
  return audit.membership_inference(-scores[included],
                                    -scores[~included])['auc']


def _check_same_canaries(workdir: str, setup: dict[str, int]) -> None:
  """Records the canary setup; refuses to resume a run with other canaries.

  train_and_evaluate resumes from the workdir's checkpoint, and it would
  accept one trained with other canaries whenever the example count matches.
  """
  path = os.path.join(workdir, 'audit_canaries.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != setup:
      raise ValueError(f'{workdir} holds an audit run with canaries {saved}, '
                       f'not {setup}; use a new workdir.')
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(setup, f)


def run_audit(config: ml_collections.ConfigDict, workdir: str, *,
              num_canaries: int, canary_seed: int = 0,
              guess_fraction: float = 0.1, significance: float = 0.05,
              num_decoys: int = 8, num_score_draws: int = 4,
              num_mia_examples: int = 1000) -> dict[str, Any]:
  """Adds canaries, trains once, scores them and runs the MIA.

  Args:
    config: the training config (``dplh_jax/hyperface/configs/audit_*.py``).
    workdir: the training run's directory (resumes like main.py).
    num_canaries: m >= 1.
    canary_seed: seed of the canaries and of their inclusion coins.
    guess_fraction: k = round(guess_fraction * m) guesses per side.
    significance: of the lower bound.
    num_decoys: decoy label sets per canary for ``calibrated_scores``.
    num_score_draws: proposal draws averaged per scored image.
    num_mia_examples: at most this many members and non-members.

  Returns:
    The JSON-serializable results (see the module docstring).
  """
  if num_canaries < 1:
    raise ValueError(f'num_canaries={num_canaries}: need at least 1.')
  if not 0 < guess_fraction <= 0.5:
    raise ValueError(f'guess_fraction={guess_fraction}: must be in (0, 0.5].')
  for name, value in (('num_decoys', num_decoys),
                      ('num_score_draws', num_score_draws),
                      ('num_mia_examples', num_mia_examples)):
    if value < 1:
      raise ValueError(f'{name}={value}: must be >= 1.')
  start = time.time()
  _check_same_canaries(workdir, {'num_canaries': num_canaries,
                                 'canary_seed': canary_seed})
  data = data_loading.load_data(config)
  image_size = np.shape(data.train[0]['image'])[:2]
  canaries = [canaries_lib.make_canary(canary_seed, i, image_size,
                                       num_decoys)
              for i in range(num_canaries)]
  included = canaries_lib.inclusion_coins(canary_seed, num_canaries)
  train_source = canaries_lib.WithCanaries(
      data.train, [c[0] for c, inc in zip(canaries, included) if inc])
  result = train.train_and_evaluate(
      config, workdir, data=data_loading.Data(train_source, data.test,
                                           data.pipeline_config))
  params = result['state'].params
  privacy = result['privacy']

  scores, losses = calibrated_scores(config, params, canaries,
                                     data.pipeline_config, num_score_draws)
  k = int(round(guess_fraction * num_canaries))
  guesses = audit.guesses_from_scores(scores, k, k)
  num_guesses, num_correct = audit.count_correct(guesses, included)
  bound = audit.epsilon_lower_bound(num_guesses, num_correct,
                                    significance=significance)

  # Members: real training images only (never canaries); non-members: test
  # images, which training never reads (evaluation only).
  members = [data.train[i]
             for i in range(min(num_mia_examples, len(data.train)))]
  nonmembers = [data.test[i]
                for i in range(min(num_mia_examples, len(data.test)))]
  member_losses = per_image_losses(config, params, members,
                                   data.pipeline_config, num_score_draws)
  nonmember_losses = per_image_losses(config, params, nonmembers,
                                      data.pipeline_config, num_score_draws)
  mia = audit.membership_inference(member_losses['total'],
                                   nonmember_losses['total'])
  mia |= {'member_loss_mean': float(member_losses['total'].mean()),
          'nonmember_loss_mean': float(nonmember_losses['total'].mean())}

  def mean_by_inclusion(values):
    return {'included': float(values[included].mean()) if included.any()
            else None,
            'excluded': float(values[~included].mean()) if (~included).any()
            else None}

  return {
      'canary_audit': {
          'method': 'one-run audit, Steinke, Nasr, Jagielski 2023, delta=0',
          'score': f'mean loss under {num_decoys} decoy label sets minus '
                   'loss under the canary\'s own labels, each a mean over '
                   f'{num_score_draws} proposal draws (black box)',
          'num_canaries': num_canaries,
          'canary_seed': canary_seed,
          'num_included': int(included.sum()),
          'num_positive_guesses': k,
          'num_negative_guesses': k,
          'num_guesses': num_guesses,
          'num_correct': num_correct,
          'significance': significance,
          'epsilon_lower_bound': bound,
          'theoretical_epsilon': privacy['epsilon'],
          'theoretical_delta': privacy['delta'],
          # After the fact, with the coins: how separable the scores were.
          # Not part of the bound, which uses only the guesses fixed above.
          'diagnostics': {
              'auc_calibrated_score': _auc(scores, included),
              'auc_raw_loss': _auc(-losses['canary_loss']['total'],
                                   included),
              'mean_score_by_task': {
                  name: mean_by_inclusion(losses['decoy_loss'][name]
                                          - losses['canary_loss'][name])
                  for name in losses['canary_loss']},
          },
          'included': [bool(v) for v in included],
          'guesses': [int(g) for g in guesses],
          'scores': _rounded(scores),
          'raw_losses': _rounded(losses['canary_loss']['total']),
      },
      'membership_inference': mia,
      'privacy_report': privacy,
      'eval': result['eval'],
      'config': json.loads(config.to_json()),
      'num_real_train_images': len(data.train),
      'wall_time_s': round(time.time() - start, 1),
  }


def write_results(results: dict[str, Any], path: str) -> None:
  """Writes ``results`` as JSON, one line per list (diff-friendly, small)."""
  text = json.dumps(results, indent=1)
  # Lists of numbers and booleans on one line instead of one per element.
  text = re.sub(r'\[\s+([^\[\]{}"]*?)\s+\]',
                lambda match: '[' + ' '.join(match.group(1).split()) + ']',
                text)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text + '\n')


def format_summary(results: dict[str, Any]) -> str:
  """A few lines: guesses, the lower bound, theory and the MIA figures."""
  audit_results = results['canary_audit']
  mia = results['membership_inference']
  eps = audit_results['theoretical_epsilon']
  theory = ('none (non-private)' if eps is None else
            f'{eps:.3f} at delta={audit_results["theoretical_delta"]:g}')
  return '\n'.join([
      f'canaries: {audit_results["num_canaries"]} '
      f'({audit_results["num_included"]} included); guesses '
      f'{audit_results["num_guesses"]}, correct '
      f'{audit_results["num_correct"]}',
      f'epsilon lower bound (delta=0, {1 - audit_results["significance"]:.0%}'
      f' confidence): {audit_results["epsilon_lower_bound"]:.3f}',
      f'theoretical epsilon: {theory}',
      f'membership inference ({mia["num_members"]} train vs '
      f'{mia["num_nonmembers"]} test images): '
      f'AUC {mia["auc"]:.3f}, TPR@1%FPR {mia["tpr_at_fpr_0.01"]:.3f}, '
      f'TPR@0.1%FPR {mia["tpr_at_fpr_0.001"]:.3f}',
  ])
