"""FaceAnalyzer on a tiny-config workdir: the face schema, crops
equal to training's, one compile per size bucket, the params-only export,
image-level evaluation and the dplh-analyze command."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dplh_jax.dp import noise_keys
from dplh_jax.hyperface import analyzer as analyzer_lib
from dplh_jax.hyperface import candidates
from dplh_jax.hyperface import checkpoint
from dplh_jax.hyperface import export
from dplh_jax.hyperface import face_drawing
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface import train_step
from dplh_jax.hyperface.configs import tiny
from dplh_jax.hyperface.datasets import synthetic_scene

pytestmark = pytest.mark.slow
# Few windows, small chunks, and every window into IRP: an untrained
# model's scores are near 0.5 either side.
FAST = analyzer_lib.AnalyzerOptions(
    windows=candidates.WindowConfig(min_size_fraction=0.3, scale_step=1.6,
                                    stride_fraction=0.5),
    detection_threshold=0.0, max_irp_boxes=64, chunk_size=64, min_score=0.0)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny-config workdir as dplh-train leaves it, at step 0 (training it
  would take most of this file's time budget; the schema needs no skill):
  config.json, a checkpoint of the whole TrainState (params and the
  optimizer state with the DP noise key) and a privacy report."""
  config = tiny.get_config()
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))
  path = str(tmp_path_factory.mktemp('tiny_run'))
  config_dict = json.loads(json.dumps(config.to_dict()))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'config': config_dict}, f)
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  spec = train_step.StepSpec.from_config(config, model, weighting, 1.0)
  tx = train_step.make_optimizer(spec, noise_keys.secret_key(0)[0])
  state = train_step.TrainState(jnp.int32(0), params, tx.init(params))
  checkpointer = checkpoint.Checkpointer(os.path.join(path, 'checkpoints'))
  checkpointer.save(0, state, {'config': config_dict})
  checkpointer.close()
  with open(os.path.join(path, 'privacy_report.json'), 'w') as f:
    json.dump({'dp': True, 'epsilon': 0.0, 'delta': 1e-5, 'steps': 0,
               'non_finite_examples_dropped': 0,
               'not_covered_by_the_guarantee': ['train lines']}, f)
  return path


@pytest.fixture(scope='module')
def analyzer(workdir):
  return analyzer_lib.FaceAnalyzer.from_workdir(workdir, FAST)


def _scene(index, size=64):
  return synthetic_scene.render_scene(
      5, 1, index, synthetic_scene.SceneConfig(image_size=size, max_faces=2))


def test_crops_in_jax_are_the_training_crops(analyzer):
  image, _ = _scene(0)
  boxes = proposals.random_boxes((64, 64), 20, np.random.default_rng(0))
  boxes[:3] = [[-20, -10, 100, 90], [60, 60, 9, 9], [0.3, 0.7, 63.1, 1.5]]
  crop = jax.jit(analyzer_lib.crop_and_resize, static_argnums=2)
  got = crop(jnp.asarray(analyzer._padded(image)), jnp.asarray(boxes), 32)
  # Equal up to float32 rounding in XLA's fused arithmetic (1e-5 is 1/400
  # of one grey level).
  np.testing.assert_allclose(np.asarray(got), proposals.crop_and_resize(
      image, boxes, (32, 32)), atol=1e-5)


def test_faces_follow_the_schema_and_compile_once_per_size_bucket(analyzer):
  faces = analyzer.analyze(_scene(1)[0])
  assert faces, 'min_score=0 keeps every L-NMS detection'
  for face in faces:
    assert face.box.shape == (4,) and np.all(np.isfinite(face.box))
    assert face.box[2] > 0 and face.box[3] > 0
    assert face.landmarks.shape == (21, 2)
    assert set(np.unique(face.visibility)) <= {0.0, 1.0}
    assert face.visibility_scores.shape == (21,) and face.pose.shape == (3,)
    assert 0 <= face.score <= 1 and 0 <= face.gender_probability <= 1
    assert face.gender == int(face.gender_probability > 0.5)
  assert [f.score for f in faces] == sorted((f.score for f in faces),
                                            reverse=True)
  record = json.loads(json.dumps(faces[0].to_json()))
  assert len(record['landmarks']) == 21 and len(record['pose']) == 3
  compiles = analyzer.num_compiles()
  analyzer.analyze(_scene(2)[0])                      # same bucket (64)
  analyzer.analyze(np.zeros((50, 40, 3), np.uint8))   # same bucket
  assert analyzer.num_compiles() == compiles
  analyzer.analyze(np.zeros((70, 40, 3), np.uint8))   # 128 x 64
  assert analyzer.num_compiles() == compiles + 1
  with pytest.raises(ValueError, match='dtype float64'):
    analyzer.analyze(np.zeros((8, 8, 3)))


def test_the_export_holds_the_params_alone_and_gives_the_same_faces(
    workdir, analyzer, tmp_path):
  path = str(tmp_path / 'model.npz')
  export.export_params(workdir, path)
  with np.load(path, allow_pickle=False) as archive:
    names = archive.files
    meta = json.loads(str(archive['__meta__']))
  assert all(n.startswith('params/params/') for n in names
             if n != '__meta__')
  assert not any('opt_state' in n or 'noise' in n for n in names)
  # The tiny config sets noise_seed=0: the seed is the noise key.
  assert 'noise_seed' not in meta['config']
  assert 'sampler_seed' not in meta['config']
  assert meta['privacy']['delta'] == 1e-5
  assert 'non_finite_examples_dropped' not in meta['privacy']
  shared = analyzer_lib.FaceAnalyzer.from_params_file(path, FAST)
  image = _scene(3)[0]
  for mine, theirs in zip(analyzer.analyze(image), shared.analyze(image),
                          strict=True):
    np.testing.assert_array_equal(mine.landmarks, theirs.landmarks)
    assert mine.score == theirs.score
  unfinished = str(tmp_path / 'unfinished')
  shutil.copytree(workdir, unfinished)
  os.remove(os.path.join(unfinished, 'privacy_report.json'))
  with pytest.raises(ValueError, match='has not finished'):
    export.export_params(unfinished, str(tmp_path / 'no.npz'))
  assert analyzer_lib.FaceAnalyzer.from_workdir(
      unfinished, FAST).describe()['finished'] is False
  with pytest.raises(ValueError, match='not a params file'):
    export.read_params_file(os.path.join(workdir, 'config.json'))


def test_image_level_evaluation_counts_every_test_face(analyzer):
  source = image_eval.open_test_split(analyzer.released.config)
  result = image_eval.evaluate(analyzer, source, num_images=3)
  faces = sum(len(source[i]['faces']['bbox']) for i in range(3))
  assert (result['num_images'], result['num_faces']) == (3, faces)
  assert 0 <= result['image_detection_ap'] <= 1
  panel = face_drawing.draw_faces(np.asarray(source[0]['image']),
                                  analyzer.analyze(source[0]['image']), 2)
  assert panel.size == (128, 128)


def test_dplh_analyze_writes_a_json_and_a_png_per_image(workdir, tmp_path):
  image = _scene(4)[0]
  Image.fromarray(image).save(tmp_path / 'photo.png')
  out = subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.analyze',
       f'--workdir={workdir}', str(tmp_path / 'photo.png'),
       f'--out={tmp_path / "faces"}', '--min_score=0', '--scale=2'],
      capture_output=True, text=True, cwd=tmp_path,
      env=os.environ | {'JAX_PLATFORMS': 'cpu'}, check=False)
  assert out.returncode == 0, out.stderr
  with open(tmp_path / 'faces' / 'photo.json') as f:
    record = json.load(f)
  assert (record['height'], record['width']) == (64, 64)
  assert record['model']['finished'] and record['model']['dp']
  assert record['faces'] and set(record['faces'][0]) >= {
      'box', 'score', 'landmarks', 'visibility', 'pose', 'gender',
      'gender_probability'}
  with Image.open(tmp_path / 'faces' / 'photo.png') as drawn:
    assert drawn.size == (128, 128)
  with pytest.raises(ValueError, match='holds no config.json'):
    analyzer_lib.FaceAnalyzer.from_workdir(str(tmp_path))  # one line in CLIs
