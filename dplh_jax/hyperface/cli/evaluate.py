"""``dplh-evaluate``: HyperFace's image-level metrics of one or more trained
runs on whole test images, and a figure of annotated test images.

  dplh-evaluate workdirs/default workdirs/nonprivate --num_images 500 \
      --json_out results.json --figure faces.png --figure_images 4
  dplh-evaluate --workdir workdirs/default     # the same, as dplh-analyze

Each MODEL is a dplh-train workdir or a dplh-export file (--workdir adds
one more, and may be repeated). Every model runs
HyperFace's inference (``analyzer``: windows, IRP, L-NMS) on the first
--num_images test images of its run's dataset; the metrics
(``image_eval``: detection AP at IoU 0.5 over whole images, and landmark
NME, visibility, pose and gender of the faces matched at --score_threshold)
are printed as one table, a column per model. --figure draws the first
--figure_images test images: the annotations, then each model's faces.
The test split is read from --data_dir, else from the workdir's data_dir,
else from TFDS's default folder. Reads only the released params and the test
split.
"""

import json
import math
import os

from absl import app
from absl import flags
import numpy as np

from dplh_jax.hyperface import analyzer as analyzer_lib
from dplh_jax.hyperface import face_drawing
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_multi_string('workdir', [], 'A dplh-train workdir to '
                                     'evaluate (as a MODEL argument).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS folder of the test '
                                'split (default: the workdir\'s data_dir, '
                                'else TFDS\'s default).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 500, 'Test images to '
                                   'evaluate (-1: all).')
_SCORE_THRESHOLD = flags.DEFINE_float(
    'score_threshold', 0.5, 'Operating point: detections scoring at least '
    'this count for precision, recall and the face metrics.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the metrics '
                                'here.')
_FIGURE = flags.DEFINE_string('figure', None, 'Write a PNG of annotated test '
                              'images here.')
_FIGURE_IMAGES = flags.DEFINE_integer('figure_images', 4, 'Test images in '
                                      'the figure.')
_FIGURE_SCALE = flags.DEFINE_integer('figure_scale', 2, 'Enlargement of the '
                                     'figure\'s images.')

ROWS = (
    ('image_detection_ap', 'detection AP (whole images, IoU 0.5)', '.3f'),
    ('image_precision', 'precision at the operating point', '.3f'),
    ('image_recall', 'recall at the operating point', '.3f'),
    ('image_landmark_nme', 'landmark NME of found faces', '.3f'),
    ('image_visibility_accuracy', 'visibility accuracy of found faces', '.3f'),
    ('image_pose_mae_deg', 'pose MAE of found faces (degrees)', '.1f'),
    ('image_gender_accuracy', 'gender accuracy of found faces', '.3f'),
)


def label(analyzer: analyzer_lib.FaceAnalyzer) -> str:
  info = analyzer.describe()
  name = os.path.basename(os.path.normpath(info['source']))
  if not info['dp']:
    return f'{name} (non-private)'
  if info['epsilon'] is None:
    return f'{name} (DP, unfinished, step {info["step"]})'
  return f'{name} (DP, epsilon {info["epsilon"]:.2f})'


def load(model: str) -> analyzer_lib.FaceAnalyzer:
  if os.path.isdir(model):
    return analyzer_lib.FaceAnalyzer.from_workdir(model)
  if os.path.isfile(model):
    return analyzer_lib.FaceAnalyzer.from_params_file(model)
  raise ValueError(f'{model} is neither a workdir nor a params file.')


def table(labels, results, score_threshold) -> str:
  lines = ['| metric (test split) | ' + ' | '.join(labels) + ' |',
           '|---|' + '---|' * len(labels)]
  for key, name, fmt in ROWS:
    values = [('-' if math.isnan(r[key]) else format(r[key], fmt))
              for r in results]
    lines.append(f'| {name} | ' + ' | '.join(values) + ' |')
  counts = results[0]
  lines.append(f'\n{counts["num_images"]} test images, {counts["num_faces"]} '
               f'faces; operating point: score >= {score_threshold}.')
  return '\n'.join(lines)


def draw_figure(analyzers, labels, path, num_images, scale) -> None:
  source = image_eval.open_run_test_split(analyzers[0], _DATA_DIR.value)
  records = [source[i] for i in range(min(num_images, len(source)))]
  images = [np.asarray(r['image']) for r in records]
  rows = [('annotations', [
      face_drawing.draw_faces(image, face_drawing.faces_from_annotations(
          image_eval.annotated_faces(record, index)), scale)
      for index, (image, record) in enumerate(zip(images, records))])]
  for analyzer, name in zip(analyzers, labels):
    rows.append((name, [face_drawing.draw_faces(image, analyzer.analyze(image),
                                                scale) for image in images]))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  face_drawing.save_png(face_drawing.figure(rows), path, colors=256)


def main(argv):
  models = list(argv[1:]) + list(_WORKDIR.value)
  if not models:
    raise app.UsageError('pass one or more workdirs or params files: '
                         'dplh-evaluate MODEL [MODEL...] (or --workdir W)')
  flags_util.start(argv[:1], config=True)

  def evaluate_all():
    analyzers = [load(model) for model in models]
    labels = [label(a) for a in analyzers]
    results = []
    for analyzer in analyzers:
      source = image_eval.open_run_test_split(analyzer, _DATA_DIR.value)
      results.append(image_eval.evaluate(
          analyzer, source, _NUM_IMAGES.value,
          score_threshold=_SCORE_THRESHOLD.value))
    print(table(labels, results, _SCORE_THRESHOLD.value))
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'w') as f:
        json.dump({'score_threshold': _SCORE_THRESHOLD.value, 'models': [
            {'label': name, 'model': a.describe(), 'metrics': r}
            for name, a, r in zip(labels, analyzers, results)]}, f, indent=1)
        f.write('\n')
      print(f'metrics: {_JSON_OUT.value}')
    if _FIGURE.value:
      draw_figure(analyzers, labels, _FIGURE.value, _FIGURE_IMAGES.value,
                  _FIGURE_SCALE.value)
      print(f'figure: {_FIGURE.value}')

  flags_util.one_line_errors(evaluate_all)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
