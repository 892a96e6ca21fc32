"""MetricWriter: JSON lines and TensorBoard scalars hold the same numbers."""

import json
import math
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from dplh_jax.hyperface import metric_writer


def _scalars(workdir, split, tag):
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard', split))
  events.Reload()
  return [(e.step, e.value) for e in events.Scalars(tag)]


def test_numbers_nan_included_reach_tensorboard_and_the_rest_is_left_out(
    tmp_path):
  workdir = str(tmp_path)
  writer = metric_writer.MetricWriter(workdir)
  writer.write(1, 'train', {'loss': 0.5, 'count': 3, 'epsilon': None,
                            'dp': True, 'name': 'x'})
  writer.write(2, 'train', {'loss': float('nan'), 'count': np.int64(4)})
  writer.write(2, 'eval', {'accuracy': np.float32(0.25)})
  writer.close()
  loss = _scalars(workdir, 'train', 'loss')
  assert loss[0] == (1, 0.5) and loss[1][0] == 2 and math.isnan(loss[1][1])
  assert _scalars(workdir, 'train', 'count') == [(1, 3.0), (2, 4.0)]
  assert _scalars(workdir, 'eval', 'accuracy') == [(2, 0.25)]
  tags = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard', 'train'))
  tags.Reload()
  assert sorted(tags.Tags()['scalars']) == ['count', 'loss']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert first == {'step': 1, 'split': 'train', 'loss': 0.5, 'count': 3,
                   'epsilon': None, 'dp': True, 'name': 'x'}


def test_a_resume_replaces_the_lines_and_events_of_replayed_steps(tmp_path):
  workdir = str(tmp_path)
  writer = metric_writer.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  writer.write(2, 'eval', {'accuracy': 0.5})
  writer.write(3, 'eval', {'accuracy': 0.75})
  writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 4, "spl')  # cut off by the kill
  # Resumed from the checkpoint at step 2: steps 3 on are written again.
  writer = metric_writer.MetricWriter(workdir, resume_step=2)
  writer.write(3, 'train', {'loss': 30.0})
  writer.write(3, 'eval', {'accuracy': 0.0})
  writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [(l['step'], l['split']) for l in lines] == [
      (1, 'train'), (2, 'train'), (2, 'eval'), (3, 'train'), (3, 'eval')]
  assert _scalars(workdir, 'train', 'loss') == [(1, 1.0), (2, 2.0),
                                                (3, 30.0)]
  assert _scalars(workdir, 'eval', 'accuracy') == [(2, 0.5), (3, 0.0)]
  # A finished run resumed at its last step writes its final eval again.
  writer = metric_writer.MetricWriter(workdir, resume_step=3,
                                      rewritten_splits=('eval',))
  writer.write(3, 'eval', {'accuracy': 0.25})
  writer.close()
  assert _scalars(workdir, 'eval', 'accuracy') == [(2, 0.5), (3, 0.25)]
  assert _scalars(workdir, 'train', 'loss')[-1] == (3, 30.0)
