"""Tests of the aflw builder on a tiny fake aflw.sqlite and image folder."""

import sqlite3

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dplh_jax.hyperface.datasets import aflw
from dplh_jax.hyperface.datasets import aflw_records

_SCHEMA = """
CREATE TABLE faces (face_id INTEGER PRIMARY KEY, file_id TEXT, db_id TEXT);
CREATE TABLE faceimages (image_id INTEGER PRIMARY KEY, db_id TEXT,
    file_id TEXT, filepath TEXT, bw INTEGER, width INTEGER, height INTEGER);
CREATE TABLE facerect (face_id INTEGER, x INTEGER, y INTEGER, w INTEGER,
    h INTEGER, annot_type_id INTEGER);
CREATE TABLE facepose (face_id INTEGER, roll REAL, pitch REAL, yaw REAL,
    annot_type_id INTEGER);
CREATE TABLE facemetadata (face_id INTEGER, sex TEXT, occluded INTEGER,
    glasses INTEGER, bw INTEGER, annot_type_id INTEGER);
CREATE TABLE featurecoords (face_id INTEGER, feature_id INTEGER, x REAL,
    y REAL);
CREATE TABLE featurecoordtype (feature_id INTEGER, descr TEXT, code TEXT,
    x REAL, y REAL, z REAL);
"""


def _names_in_each_split(count_per_split):
  """Image paths that land in train and test (the split hashes the path)."""
  names = {'train': [], 'test': []}
  for i in range(1000):
    name = f'0/image{i:05d}.jpg'
    split = aflw._split_of(name)
    if len(names[split]) < count_per_split:
      names[split].append(name)
  return names['train'], names['test']


def _write_jpeg(path, size=(80, 60), mode='RGB'):
  path.parent.mkdir(parents=True, exist_ok=True)
  color = 128 if mode == 'L' else (200, 100, 50)
  Image.new(mode, size, color).save(path, format='JPEG')


def _add_face(db, face_id, file_id, rect=(10, 8, 30, 30), pose=(0.1, -0.2, 0.3),
              sex='m', coords=None):
  db.execute('INSERT INTO faces VALUES (?, ?, ?)', (face_id, file_id, 'flickr'))
  if rect is not None:
    db.execute('INSERT INTO facerect VALUES (?, ?, ?, ?, ?, 1)',
               (face_id, *rect))
  if pose is not None:
    db.execute('INSERT INTO facepose VALUES (?, ?, ?, ?, 1)', (face_id, *pose))
  db.execute('INSERT INTO facemetadata VALUES (?, ?, 0, 0, 0, 1)',
             (face_id, sex))
  if coords is None:
    coords = {f: (20.0 + f, 20.0) for f in range(1, 22)}
  for feature_id, (x, y) in coords.items():
    db.execute('INSERT INTO featurecoords VALUES (?, ?, ?, ?)',
               (face_id, feature_id, x, y))


@pytest.fixture(scope='module')
def fake_aflw(tmp_path_factory):
  """Builds the fake AFLW once; returns (builder, expected facts)."""
  root = tmp_path_factory.mktemp('aflw')
  manual = root / 'manual'
  manual.mkdir()
  (train_a, train_b, train_c), (test_a, test_b, test_c) = (
      _names_in_each_split(3))
  db = sqlite3.connect(manual / 'aflw.sqlite')
  db.executescript(_SCHEMA)
  images = {
      'good': train_a, 'grey': test_a, 'missing': train_b,
      'corrupt': test_b, 'no_rect': train_c, 'good_test': test_c,
  }
  for i, (key, path) in enumerate(images.items()):
    db.execute('INSERT INTO faceimages VALUES (?, ?, ?, ?, 0, 80, 60)',
               (i, 'flickr', key, path))
  # 'good': two faces. Face 1 lacks landmark 13 (index 12, LeftEar); face 2
  # has unknown sex, no pose, and landmark 21 far outside the 80x60 image.
  coords = {f: (20.0 + f, 20.0) for f in range(1, 22) if f != 13}
  _add_face(db, 1, 'good', coords=coords)
  outside = {f: (40.0 + f, 30.0) for f in range(1, 21)}
  outside[21] = (500.0, 30.0)
  _add_face(db, 2, 'good', rect=(40, 20, 35, 35), pose=None, sex=None,
            coords=outside)
  _add_face(db, 3, 'grey', sex='f')
  _add_face(db, 4, 'missing')
  _add_face(db, 5, 'corrupt')
  _add_face(db, 6, 'no_rect', rect=None)
  _add_face(db, 7, 'good_test', sex='f')
  db.commit()
  db.close()
  flickr = manual / 'flickr'
  _write_jpeg(flickr / images['good'])
  _write_jpeg(flickr / images['grey'], mode='L')
  _write_jpeg(flickr / images['good_test'])
  (flickr / images['corrupt']).write_bytes(b'not a jpeg at all')
  builder = aflw.Aflw(data_dir=str(root / 'data'))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder, images


def _records_by_path(builder):
  records = {}
  for split, source in builder.as_data_source().items():
    for i in range(len(source)):
      record = source[i]
      records[record['image_id'].decode()] = (split, record)
  return records


def test_good_images_are_converted_and_bad_ones_skipped(fake_aflw):
  builder, images = fake_aflw
  records = _records_by_path(builder)
  assert set(records) == {images['good'], images['grey'], images['good_test']}
  assert records[images['good']][0] == 'train'
  assert records[images['grey']][0] == 'test'
  grey_image = records[images['grey']][1]['image']
  assert grey_image.shape == (60, 80, 3)  # greyscale converted to RGB


def test_labels_follow_the_schema(fake_aflw):
  builder, images = fake_aflw
  faces = _records_by_path(builder)[images['good']][1]['faces']
  bbox = np.stack(faces['bbox'])
  np.testing.assert_array_equal(bbox, [[10, 8, 30, 30], [40, 20, 35, 35]])
  visibility = np.stack(faces['visibility'])
  landmarks = np.stack(faces['landmarks'])
  # Missing featurecoords row -> invisible (feature 13 = index 12).
  assert visibility[0, 12] == 0 and visibility[0].sum() == 20
  np.testing.assert_allclose(landmarks[0, 0], [21.0, 20.0])
  # A point outside the image is made invisible, the others stay.
  assert visibility[1, 20] == 0 and visibility[1, :20].all()
  assert list(np.stack(faces['gender'])) == [1, -1]  # sex NULL -> unknown
  pose = np.stack(faces['pose'])
  np.testing.assert_allclose(pose[0], [0.1, -0.2, 0.3], rtol=1e-6)
  assert np.isnan(pose[1]).all()  # no facepose row -> NaN


def test_problems_are_counted_in_metadata(fake_aflw):
  builder, _ = fake_aflw
  problems = tfds.builder_from_directory(builder.data_dir).info.metadata[
      'problems']
  assert problems['images_skipped_missing_file'] == 1
  assert problems['images_skipped_unreadable_file'] == 1
  assert problems['images_skipped_face_without_rect'] == 1
  assert problems['landmarks_outside_image_made_invisible'] == 1
  assert problems['faces_without_pose'] == 1
  assert problems['faces_unknown_gender'] == 1
  assert problems['images'] == 3 and problems['faces'] == 4


def test_bad_feature_id_is_an_error_naming_the_face(tmp_path):
  path = tmp_path / 'aflw.sqlite'
  db = sqlite3.connect(path)
  db.executescript(_SCHEMA)
  db.execute("INSERT INTO faceimages VALUES (0, 'flickr', 'a', '0/a.jpg', 0,"
             ' 80, 60)')
  _add_face(db, 42, 'a', coords={22: (1.0, 2.0)})
  db.commit()
  db.close()
  with pytest.raises(ValueError, match='face_id 42 .*feature_id 22'):
    aflw_records.read_annotations(str(path))


def test_missing_sqlite_explains_the_manual_download(tmp_path):
  builder = aflw.Aflw(data_dir=str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError, match='No aflw.sqlite'):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path)))
