"""Tests of the synthetic_faces renderer and TFDS builder (tiny config)."""

import dataclasses
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import dplh_jax.hyperface.datasets  # pylint: disable=unused-import  (registers)
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface.datasets import face_schema
from dplh_jax.hyperface.datasets import head_model
from dplh_jax.hyperface.datasets import synthetic_faces
from dplh_jax.hyperface.datasets import synthetic_scene

_TINY = synthetic_scene.SceneConfig(image_size=64, max_faces=2)


def _build(data_dir):
  builder = synthetic_faces.SyntheticFaces(config='tiny', data_dir=data_dir)
  builder.download_and_prepare()
  return builder.as_data_source()


def _all_records(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def tiny_sources(tmp_path_factory):
  first = _build(str(tmp_path_factory.mktemp('first')))
  again = _build(str(tmp_path_factory.mktemp('again')))
  return first, again


def test_registered_with_tiny_and_demo_configs():
  builder = tfds.builder('synthetic_faces/tiny', data_dir='/nonexistent')
  assert builder.builder_config.num_train == 24
  assert 'demo' in synthetic_faces.SyntheticFaces.builder_configs
  assert synthetic_faces.SyntheticFaces.builder_configs['demo'].num_train >= (
      10_000)


def test_tiny_build_has_schema_shapes(tiny_sources):
  source, _ = tiny_sources
  assert {split: len(s) for split, s in source.items()} == {'train': 24,
                                                            'test': 8}
  num_faces = 0
  for record in _all_records(source['train']):
    assert record['image'].shape == (64, 64, 3)
    assert record['image'].dtype == np.uint8
    faces = record['faces']
    for key, shape in [('bbox', (4,)), ('landmarks', (21, 2)),
                       ('visibility', (21,)), ('pose', (3,)), ('gender', ())]:
      for value in faces[key]:
        assert np.shape(value) == shape
    num_faces += len(faces['bbox'])
    assert all(g in (0, 1) for g in faces['gender'])
  assert num_faces >= 24  # about 1.3 faces per image


def test_same_seed_builds_identical_data(tiny_sources):
  first, again = tiny_sources
  for split in ('train', 'test'):
    for a, b in zip(_all_records(first[split]), _all_records(again[split])):
      np.testing.assert_array_equal(a['image'], b['image'])
      for key in a['faces']:
        np.testing.assert_array_equal(np.asarray(a['faces'][key]),
                                      np.asarray(b['faces'][key]))


def test_different_seed_changes_images_and_labels():
  image_a, faces_a = synthetic_scene.render_scene(0, 0, 3, _TINY)
  image_b, faces_b = synthetic_scene.render_scene(1, 0, 3, _TINY)
  again, faces_again = synthetic_scene.render_scene(0, 0, 3, _TINY)
  np.testing.assert_array_equal(image_a, again)
  np.testing.assert_array_equal(faces_a['landmarks'], faces_again['landmarks'])
  assert not np.array_equal(image_a, image_b)
  assert not np.array_equal(faces_a['bbox'], faces_b['bbox'])


def test_builder_stores_the_rendered_labels(tiny_sources):
  source, _ = tiny_sources
  record = source['test'][0]
  index = int(record['image_id'].decode().split('/')[1])
  image, faces = synthetic_scene.render_scene(0, 1, index, _TINY)
  np.testing.assert_array_equal(np.stack(record['faces']['landmarks']),
                                faces['landmarks'])
  jpeg = synthetic_scene.encode_jpeg(image, _TINY.jpeg_quality)
  np.testing.assert_array_equal(record['image'],
                                np.asarray(Image.open(io.BytesIO(jpeg))))


def test_gender_label_noise_flips_labels_only():
  clean = dataclasses.replace(_TINY, gender_label_noise=0.0)
  flipped = dataclasses.replace(_TINY, gender_label_noise=1.0)
  for index in range(6):
    image_clean, faces_clean = synthetic_scene.render_scene(0, 0, index, clean)
    image_flip, faces_flip = synthetic_scene.render_scene(0, 0, index, flipped)
    np.testing.assert_array_equal(image_clean, image_flip)
    np.testing.assert_array_equal(faces_clean['gender'],
                                  1 - faces_flip['gender'])


def test_gender_cues_follow_the_true_gender():
  """Version 1.1.0's cue rates, 2,000 draws per gender (binomial sd <= 0.011,
  so +-0.04 is over 3.5 sd): lipstick 90% of women, beard 60% of men, long
  hair 90% / 5%, and thicker brows and thinner lips on men."""
  rng = np.random.default_rng(0)
  looks = {male: [synthetic_scene._sample_appearance(rng, male)
                  for _ in range(2000)] for male in (False, True)}

  def rate(male, has_cue):
    return np.mean([has_cue(look) for look in looks[male]])

  # Painted lips have red - green >= 0.6; natural ones (skin-toned) <= 0.45.
  lipstick = lambda look: look.lips[0] - look.lips[1] > 0.52
  assert rate(False, lipstick) == pytest.approx(0.9, abs=0.04)
  assert rate(True, lipstick) == 0.0
  assert rate(True, lambda look: look.beard > 0) == pytest.approx(0.6, abs=0.04)
  assert rate(False, lambda look: look.beard > 0) == 0.0
  long_hair = lambda look: look.long_hair
  assert rate(False, long_hair) == pytest.approx(0.9, abs=0.04)
  assert rate(True, long_hair) == pytest.approx(0.05, abs=0.04)
  assert (np.mean([l.brow_thickness for l in looks[True]])
          > np.mean([l.brow_thickness for l in looks[False]]) + 0.03)
  assert (max(l.lip_height for l in looks[True])
          <= min(l.lip_height for l in looks[False]) + 1e-9)


def _posed(yaw, center=(50.0, 50.0), roll=0.0, pitch=0.0, scale=15.0):
  return head_model.PosedHead(
      head_model.make_head(),
      head_model.rotation_matrix(np.array([roll, pitch, yaw])),
      np.array(center), scale)


def test_visibility_self_occlusion_and_border():
  names = face_schema.LANDMARK_NAMES
  _, frontal = head_model.project_landmarks(_posed(0.0), (100, 100))
  assert frontal.all()
  # Nose turned to the image right: the image-right side goes behind the head.
  _, turned = head_model.project_landmarks(_posed(np.deg2rad(75)), (100, 100))
  hidden = {names[i] for i in np.flatnonzero(turned == 0)}
  assert {'RightEar', 'RightEyeRightCorner', 'RightBrowRightCorner'} <= hidden
  assert turned[names.index('LeftEar')] == 1
  assert turned[names.index('NoseCenter')] == 1
  # Centre on the left border: the points left of it leave the image.
  points, at_border = head_model.project_landmarks(_posed(0.0, (0.0, 50.0)),
                                                   (100, 100))
  np.testing.assert_array_equal(at_border, points[:, 0] >= 0)
  assert 0 < at_border.sum() < 21


def test_mirrored_pose_projects_to_flipped_labels():
  """The renderer and the flip rule agree: R(-roll, pitch, -yaw) at the
  mirrored place gives the flipped landmarks, visibility and box."""
  pose = np.array([0.3, -0.2, 0.9])
  width = 100.0
  posed = _posed(pose[2], (30.0, 45.0), roll=pose[0], pitch=pose[1])
  mirror = _posed(-pose[2], (width - 30.0, 45.0), roll=-pose[0],
                  pitch=pose[1])
  points, visible = head_model.project_landmarks(posed, (90, 100))
  faces = proposals.Faces(head_model.silhouette_box(posed)[None],
                          points[None], visible[None], pose[None],
                          np.array([1]))
  flipped = proposals.flip_faces(faces, width)
  mirror_points, mirror_visible = head_model.project_landmarks(mirror,
                                                               (90, 100))
  np.testing.assert_allclose(flipped.landmarks[0], mirror_points, atol=1e-4)
  np.testing.assert_array_equal(flipped.visibility[0], mirror_visible)
  np.testing.assert_allclose(flipped.boxes[0],
                             head_model.silhouette_box(mirror), atol=1e-4)
  np.testing.assert_allclose(flipped.pose[0], [-0.3, -0.2, -0.9])
