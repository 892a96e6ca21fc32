"""``dplh-analyze``: faces in whole images from a trained run, as JSON and PNG.

  dplh-analyze --workdir workdirs/default photo.jpg other.png --out faces/
  dplh-analyze --params model.npz photo.jpg --out faces/
  dplh-analyze --workdir workdirs/default --test_images 4 --out faces/

Writes, per image, ``<name>.json`` (the faces: box, score, 21 landmarks with
visibility, pose, gender; see ``analyzer.Face``) and ``<name>.png`` (the
image enlarged with the faces drawn, see ``face_drawing``), and prints their
paths. ``--test_images N`` adds the first N test images of the run's dataset
(``test_000000`` ...; from the workdir's data_dir). Only the released params
are read: the latest checkpoint's params subtree of --workdir, or a file
from ``dplh-export``.
"""

import json
import os

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from dplh_jax.hyperface import analyzer as analyzer_lib
from dplh_jax.hyperface import candidates
from dplh_jax.hyperface import face_drawing
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'A dplh-train workdir.')
_PARAMS = flags.DEFINE_string('params', None, 'A params file written by '
                              'dplh-export (instead of --workdir).')
_OUT = flags.DEFINE_string('out', None, 'Folder for the JSON and PNG files '
                           '(created if missing).', required=True)
_MIN_SCORE = flags.DEFINE_float('min_score', 0.5, 'Faces scoring below this '
                                'are left out.')
_TEST_IMAGES = flags.DEFINE_integer('test_images', 0, 'Also analyze the '
                                    'first N test images of the run\'s '
                                    'dataset.')
_SCALE = flags.DEFINE_integer('scale', 3, 'Enlargement of the PNGs.')
_MIN_FACE = flags.DEFINE_float('min_face_fraction', 0.15, 'Smallest face '
                               'looked for, as a fraction of the shorter '
                               'image side (smaller: more windows, slower).')

CONVENTIONS = {
    'box': 'pixel [x, y, w, h], top-left corner and size; the image covers '
           '[0, W] x [0, H]',
    'landmarks': 'pixel (x, y), 21 points in AFLW order',
    'visibility': '1 visible, 0 not (visibility_scores > 0.5)',
    'pose': 'roll, pitch, yaw in radians (pose_degrees: the same in degrees)',
    'gender': '1 male, 0 female; gender_probability = P(male)',
    'score': 'P(face) of the detection',
}


def make_analyzer() -> analyzer_lib.FaceAnalyzer:
  if (_WORKDIR.value is None) == (_PARAMS.value is None):
    raise app.UsageError('pass exactly one of --workdir and --params.')
  options = analyzer_lib.AnalyzerOptions(
      windows=candidates.WindowConfig(min_size_fraction=_MIN_FACE.value))
  if _PARAMS.value is not None:
    return analyzer_lib.FaceAnalyzer.from_params_file(_PARAMS.value, options)
  return analyzer_lib.FaceAnalyzer.from_workdir(_WORKDIR.value, options)


def read_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except OSError as error:
    raise ValueError(f'cannot read image {path} ({error}); pass a PNG or '
                     'JPEG file.') from error


def images_to_analyze(analyzer, paths, num_test):
  """(name, image, source) for each path, then the test images."""
  names = set()
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, suffix = stem, 1
    while name in names:
      name, suffix = f'{stem}_{suffix}', suffix + 1
    names.add(name)
    yield name, read_image(path), path
  if num_test > 0:
    from dplh_jax.hyperface import image_eval  # pylint: disable=import-outside-toplevel
    source = image_eval.open_run_test_split(analyzer)
    for index in range(min(num_test, len(source))):
      yield (f'test_{index:06d}', np.asarray(source[index]['image']),
             f'test split, image {index}')


def main(argv):
  paths = list(argv[1:])
  if not paths and _TEST_IMAGES.value <= 0:
    raise app.UsageError('pass images: dplh-analyze --workdir W IMAGE... '
                         '--out DIR (or --test_images N)')
  flags_util.start(argv[:1], config=True)

  def analyze_all():
    analyzer = make_analyzer()
    os.makedirs(_OUT.value, exist_ok=True)
    for name, image, source in images_to_analyze(analyzer, paths,
                                                 _TEST_IMAGES.value):
      faces = analyzer.analyze(image, min_score=_MIN_SCORE.value)
      record = {'image': source, 'height': int(image.shape[0]),
                'width': int(image.shape[1]), 'model': analyzer.describe(),
                'conventions': CONVENTIONS,
                'faces': [face.to_json() for face in faces]}
      json_path = os.path.join(_OUT.value, name + '.json')
      with open(json_path, 'w') as f:
        json.dump(record, f, indent=1)
        f.write('\n')
      png_path = os.path.join(_OUT.value, name + '.png')
      face_drawing.save_png(
          face_drawing.draw_faces(image, faces, _SCALE.value), png_path)
      print(f'{source}: {len(faces)} face(s) -> {json_path}, {png_path}')

  flags_util.one_line_errors(analyze_all)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
