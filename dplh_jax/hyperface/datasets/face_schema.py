"""The feature schema shared by every face dataset (synthetic_faces, aflw).

One example is one image with any number of annotated faces:

* ``image``: uint8 (H, W, 3), stored JPEG-encoded.
* ``image_id``: text naming the image in error messages (AFLW: its path;
  synthetic: ``split/index``).
* ``faces``: a sequence (one entry per face) of

  - ``bbox`` (4,) float32, **pixel [x, y, w, h]**: top-left corner and size,
    in continuous image coordinates where the image covers [0, W] x [0, H]
    and pixel (row i, column j) has its centre at (j + 0.5, i + 0.5). This is
    AFLW's own ``facerect`` convention and the (c, d, w, h) of DPLH Eq. 9; a
    box may extend past the image border (faces cut by the border).
  - ``landmarks`` (21, 2) float32, pixel (x, y) in the same coordinates,
    in the AFLW order of :data:`LANDMARK_NAMES`. Where a point is invisible
    its coordinates carry no meaning (AFLW: 0; synthetic: the projection).
  - ``visibility`` (21,) float32, 1 visible / 0 not.
  - ``pose`` (3,) float32, (roll, pitch, yaw) in radians; NaN where the
    dataset has no pose for that face.
  - ``gender`` () int32, 0 female, 1 male, -1 unknown.

"Left" and "right" in landmark names are as seen by the viewer on the
unflipped image (index 0 is the image-left corner of the image-left brow), so
a horizontal flip maps each point to its mirror partner
(:data:`FLIP_PERMUTATION`) and negates roll and yaw.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_LANDMARKS = 21

LANDMARK_NAMES = (
    'LeftBrowLeftCorner', 'LeftBrowCenter', 'LeftBrowRightCorner',
    'RightBrowLeftCorner', 'RightBrowCenter', 'RightBrowRightCorner',
    'LeftEyeLeftCorner', 'LeftEyeCenter', 'LeftEyeRightCorner',
    'RightEyeLeftCorner', 'RightEyeCenter', 'RightEyeRightCorner',
    'LeftEar', 'NoseLeft', 'NoseCenter', 'NoseRight', 'RightEar',
    'MouthLeftCorner', 'MouthCenter', 'MouthRightCorner', 'ChinCenter',
)

FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9), (12, 16),
              (13, 15), (17, 19))


def _flip_permutation() -> np.ndarray:
  permutation = np.arange(NUM_LANDMARKS)
  for left, right in FLIP_PAIRS:
    permutation[left], permutation[right] = right, left
  return permutation


# flipped_landmarks = mirrored_landmarks[FLIP_PERMUTATION]: point i of the
# flipped face is the mirror image of point FLIP_PERMUTATION[i].
FLIP_PERMUTATION = _flip_permutation()

GENDER_FEMALE, GENDER_MALE, GENDER_UNKNOWN = 0, 1, -1


def face_features() -> tfds.features.FeaturesDict:
  """Returns the TFDS features of the shared schema (see module docstring).

  Images are declared JPEG so that TFDS never needs TensorFlow to encode:
  builders hand over already-encoded bytes.
  """
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3),
                                   encoding_format='jpeg'),
      'image_id': tfds.features.Text(),
      'faces': tfds.features.Sequence({
          'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
          'landmarks': tfds.features.Tensor(shape=(NUM_LANDMARKS, 2),
                                            dtype=np.float32),
          'visibility': tfds.features.Tensor(shape=(NUM_LANDMARKS,),
                                             dtype=np.float32),
          'pose': tfds.features.Tensor(shape=(3,), dtype=np.float32),
          'gender': tfds.features.Tensor(shape=(), dtype=np.int32),
      }),
  })


def empty_faces() -> dict[str, np.ndarray]:
  """Returns the ``faces`` value of an image without faces."""
  return {
      'bbox': np.zeros((0, 4), np.float32),
      'landmarks': np.zeros((0, NUM_LANDMARKS, 2), np.float32),
      'visibility': np.zeros((0, NUM_LANDMARKS), np.float32),
      'pose': np.zeros((0, 3), np.float32),
      'gender': np.zeros((0,), np.int32),
  }


def face_dataset_info(builder, description: str, homepage: str | None = None,
                      **metadata) -> tfds.core.DatasetInfo:
  """DatasetInfo of a face builder: the shared features and box conventions."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=face_features(),
      homepage=homepage,
      metadata=tfds.core.MetadataDict(bbox_format='pixel xywh',
                                      landmark_format='pixel xy', **metadata),
  )
