"""One metric registry: the accumulator computes every metric it names, and
the summary table shows each with its label and format."""

import numpy as np

from dplh_jax.hyperface import metric_registry
from dplh_jax.hyperface import metrics


def test_the_accumulator_reports_every_registered_metric():
  accumulator = metrics.EvalAccumulator()
  k = 2
  batch = {
      'detection_label': np.array([[1, 0]]), 'landmarks': np.zeros((1, k, 21, 2)),
      'visibility': np.ones((1, k, 21)), 'pose': np.zeros((1, k, 3)),
      'gender': np.array([[1, -1]]), 'has_landmarks': np.array([True]),
      'has_pose': np.array([True]), 'has_gender': np.array([True]),
      'boxes': np.tile([0.0, 0.0, 10.0, 10.0], (1, k, 1)),
      'face_boxes': np.tile([0.0, 0.0, 10.0, 10.0], (1, k, 1)),
      'is_padding_example': np.array([False]),
  }
  outputs = {'detection': np.array([[[0.0, 1.0], [1.0, 0.0]]]),
             'landmarks': np.zeros((1, k, 42)), 'visibility': np.ones((1, k, 21)),
             'pose': np.zeros((1, k, 3)), 'gender': np.array([[[0.0, 1.0]] * k])}
  accumulator.update(outputs, batch)
  result = accumulator.result()
  for metric in metric_registry.METRICS:
    assert metric.key in result, metric.key
  assert result['detection_accuracy'] == 1.0 and result['gender_accuracy'] == 1.0


def test_summary_table_formats_each_metric_and_the_privacy_spent():
  values = {m.key: 0.123456 for m in metric_registry.METRICS}
  report = {'dp': True, 'epsilon': 4.9961, 'delta': 1e-5, 'accountant': 'pld',
            'noise_multiplier': 0.6543, 'sampling_prob': 0.0128, 'steps': 391}
  lines = metric_registry.summary_table(values, report).splitlines()
  assert len(lines) == 2 + len(metric_registry.METRICS) + 1
  assert '| detection accuracy | 0.123 |' in lines
  assert '| pose MAE (degrees) | 0.12 |' in lines
  assert lines[-1] == ('| privacy | epsilon=4.996, delta=1e-05 (pld), '
                       'sigma=0.654, q=0.0128, steps=391 |')
  assert {m.kind for m in metric_registry.METRICS} == {'accuracy', 'error'}


def test_summary_table_puts_the_constant_predictor_beside_each_metric():
  values = {m.key: 0.5 for m in metric_registry.METRICS}
  baseline = {m.key: 0.25 for m in metric_registry.METRICS}
  lines = metric_registry.summary_table(values, {'dp': False},
                                        baseline).splitlines()
  assert lines[0] == '| metric | value | constant predictor |'
  assert '| gender accuracy | 0.500 | 0.250 |' in lines
  assert lines[-1].startswith('| privacy | none (non-private) |')
