"""`aflw`: Annotated Facial Landmarks in the Wild, from a manual download.

Converts the user's aflw.sqlite and image folder into the shared schema
(face_schema: pixel [x, y, w, h] face rects, 21 landmarks with visibility
from missing coordinate rows, pose in radians, sex -> gender, unknown -1).

Splits: a fixed 70/30 train/test split by a hash of the image path (no
official split exists; DPLH used 70/30), identical on every machine.

Bad input, all counted in ``info.metadata['problems']`` and logged, never
silently relabelled: missing or unreadable image files are skipped (with
their path in the log); visible landmarks outside the image are made
invisible; see aflw_records for annotation problems.
"""

from __future__ import annotations

import io
import zlib

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from dplh_jax.hyperface.datasets import aflw_records
from dplh_jax.hyperface.datasets import face_schema

_TRAIN_PERCENT = 70
# A landmark this many pixels outside the image still counts as inside: it is
# clipped instead (annotators click on the border pixel).
_BORDER_TOLERANCE = 2.0

_INSTRUCTIONS = """\
AFLW cannot be downloaded automatically. Request it at
https://www.tugraz.at/institute/icg/research/team-bischof/lrs/downloads/aflw/
and place in the manual directory (default ~/tensorflow_datasets/downloads/
manual, or DownloadConfig(manual_dir=...)):

  <manual_dir>/aflw.sqlite
  <manual_dir>/flickr/<faceimages.filepath>   e.g. flickr/0/image00002.jpg

The original layout <manual_dir>/aflw/data/{aflw.sqlite,flickr/} also works.
"""


def _find_sqlite(manual_dir: epath.Path) -> epath.Path:
  for candidate in (manual_dir / 'aflw.sqlite',
                    manual_dir / 'aflw' / 'data' / 'aflw.sqlite',
                    manual_dir / 'data' / 'aflw.sqlite'):
    if candidate.exists():
      return candidate
  raise FileNotFoundError(f'No aflw.sqlite under {manual_dir}.\n'
                          f'{_INSTRUCTIONS}')


def missing_manual_files(manual_dir: str) -> str | None:
  """What is missing for preparing AFLW from ``manual_dir``, in one line
  saying which files go where, or None if aflw.sqlite and flickr/ are there.
  """
  manual = epath.Path(manual_dir)
  try:
    sqlite_path = _find_sqlite(manual)
  except FileNotFoundError:
    return (f'AFLW is not prepared and {manual}/aflw.sqlite is missing: put '
            f'aflw.sqlite at {manual}/aflw.sqlite and the images under '
            f'{manual}/flickr/ (e.g. flickr/0/image00002.jpg); AFLW is '
            'requested from its authors (docs/DESIGN.md, Data formats).')
  if not (sqlite_path.parent / 'flickr').is_dir():
    return (f'AFLW is not prepared and {sqlite_path.parent}/flickr/ is '
            f'missing: put the images under {sqlite_path.parent}/flickr/ '
            '(e.g. flickr/0/image00002.jpg), beside aflw.sqlite.')
  return None


def _split_of(filepath: str) -> str:
  bucket = zlib.crc32(filepath.encode('utf-8')) % 100
  return 'train' if bucket < _TRAIN_PERCENT else 'test'


def _load_image(path: epath.Path) -> tuple[bytes, int, int]:
  """Returns JPEG bytes of an RGB image and its (height, width).

  Raises:
    OSError: the file is missing or not a readable image.
  """
  data = path.read_bytes()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes fully: catches truncated files too.
    if image.format == 'JPEG' and image.mode == 'RGB':
      return data, image.height, image.width
    # Greyscale (AFLW has some), CMYK, PNG...: TFDS expects 3 channels.
    buffer = io.BytesIO()
    image.convert('RGB').save(buffer, format='JPEG', quality=95)
    return buffer.getvalue(), image.height, image.width


def _hide_outside_landmarks(faces: dict[str, np.ndarray], height: int,
                            width: int) -> int:
  """Makes visible landmarks outside the image invisible; returns how many."""
  points, visible = faces['landmarks'], faces['visibility'] > 0
  low, high = -_BORDER_TOLERANCE, np.array([width, height]) + _BORDER_TOLERANCE
  outside = visible & np.any((points < low) | (points > high), axis=-1)
  faces['visibility'] = np.where(outside, 0.0, faces['visibility']).astype(
      np.float32)
  inside = visible & ~outside
  points[inside] = np.clip(points[inside], 0, [width, height])
  faces['landmarks'] = np.where(faces['visibility'][..., None] > 0, points,
                                0.0).astype(np.float32)
  return int(outside.sum())


class Aflw(tfds.core.GeneratorBasedBuilder):
  """AFLW faces with 21 landmarks, visibility, pose and gender."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  # TFDS 4.9.10 locates a packaged builder through the undeclared
  # `importlib_resources` package; pointing at this file avoids needing it.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    """As any TFDS builder; ``file_format`` defaults to array_record."""
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return face_schema.face_dataset_info(
        self, __doc__,
        homepage='https://www.tugraz.at/institute/icg/research/team-bischof/'
                 'lrs/downloads/aflw/')

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    sqlite_path = _find_sqlite(epath.Path(dl_manager.manual_dir))
    annotations, problems = aflw_records.read_annotations(
        sqlite_path.as_posix())
    if not annotations:
      raise ValueError(f'{sqlite_path}: no usable annotated image '
                       f'(problems: {dict(problems)}).')
    self._problems = problems
    self.info.metadata['problems'] = problems
    image_root = sqlite_path.parent / 'flickr'
    by_split = {'train': [], 'test': []}
    for annotation in annotations:
      by_split[_split_of(annotation.filepath)].append(annotation)
    return {split: self._generate_examples(image_root, items)
            for split, items in by_split.items()}

  def _generate_examples(self, image_root: epath.Path,
                         annotations: list[aflw_records.ImageAnnotation]):
    problems = self._problems
    for annotation in annotations:
      path = image_root / annotation.filepath
      try:
        jpeg, height, width = _load_image(path)
      except FileNotFoundError:
        logging.warning('AFLW: skipping file_id %s: %s is missing.',
                        annotation.file_id, path)
        problems['images_skipped_missing_file'] += 1
        continue
      except (OSError, ValueError, Image.DecompressionBombError) as error:
        logging.warning('AFLW: skipping file_id %s: %s is unreadable (%s).',
                        annotation.file_id, path, error)
        problems['images_skipped_unreadable_file'] += 1
        continue
      faces = {key: np.array(value) for key, value in annotation.faces.items()}
      problems['landmarks_outside_image_made_invisible'] += (
          _hide_outside_landmarks(faces, height, width))
      problems['images'] += 1
      problems['faces'] += len(annotation.face_ids)
      yield annotation.file_id, {
          'image': jpeg, 'image_id': annotation.filepath, 'faces': faces}
    logging.info('AFLW problem counts so far: %s', dict(problems))
