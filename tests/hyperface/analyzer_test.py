"""FaceAnalyzer on the session's trained tiny-config workdir (conftest):
the face schema, crops equal to training's, one compile per size bucket,
the params-only export, image-level evaluation at the end of training and
by command, and the dplh-analyze, dplh-evaluate and dplh-export commands."""

import json
import math
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
from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import export
from dplh_jax.hyperface import face_drawing
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface import train_step
from dplh_jax.hyperface.configs import tiny
from dplh_jax.hyperface.datasets import synthetic_scene

pytestmark = pytest.mark.slow
# Few windows, small chunks, and every window into IRP: after 4 DP steps
# the model's scores are still near 0.5 either side.
FAST = analyzer_lib.AnalyzerOptions(
    windows=candidates.WindowConfig(min_size_fraction=0.3, scale_step=1.6,
                                    stride_fraction=0.5),
    detection_threshold=0.0, max_irp_boxes=64, chunk_size=64, min_score=0.0)


@pytest.fixture(scope='module')
def workdir(trained_tiny):
  """The finished tiny run (4 DP steps; conftest): config.json, checkpoints
  of the whole TrainState (params, and the optimizer state with the noise
  key), the privacy report and image_eval.json."""
  return trained_tiny.workdir


def _command(module, *args, cwd):
  """Runs ``python -m dplh_jax.hyperface.cli.<module>`` (what the console
  script runs) on the CPU."""
  return subprocess.run(
      [sys.executable, '-m', f'dplh_jax.hyperface.cli.{module}', *args],
      capture_output=True, text=True, cwd=cwd, timeout=300,
      env=os.environ | {'JAX_PLATFORMS': 'cpu'}, check=False)


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


def test_the_trained_model_finds_faces_in_the_documented_schema(analyzer):
  """The schema of ``analyzer.Face`` (and README, Faces in photographs), on
  the trained tiny model: pixel boxes on the image, probabilities in [0, 1],
  21 landmarks with visibility, pose as three angles in radians."""
  info = analyzer.describe()
  assert (info['step'], info['finished'], info['dp']) == (4, True, True)
  image = _scene(1)[0]
  height, width = image.shape[:2]
  faces = analyzer.analyze(image)
  assert faces, 'min_score=0 keeps every L-NMS detection'
  for face in faces:
    x, y, w, h = face.box
    assert face.box.shape == (4,) and np.all(np.isfinite(face.box))
    assert w > 0 and h > 0
    # Pixels of this image: the box's centre is on it (a face cut by the
    # border has a box reaching past it, as in the dataset).
    assert 0 <= x + w / 2 <= width and 0 <= y + h / 2 <= height, face.box
    assert w <= 2 * width and h <= 2 * height, face.box
    assert 0 <= face.score <= 1 and 0 <= face.gender_probability <= 1
    assert face.gender == int(face.gender_probability > 0.5)
    assert face.landmarks.shape == (21, 2)
    assert np.all(np.isfinite(face.landmarks))
    assert face.visibility.shape == face.visibility_scores.shape == (21,)
    assert set(np.unique(face.visibility)) <= {0.0, 1.0}
    np.testing.assert_array_equal(face.visibility,
                                  face.visibility_scores > 0.5)
    assert np.all(np.isfinite(face.visibility_scores))  # regressed, any real
    # Roll, pitch, yaw in radians (degrees would exceed pi).
    assert face.pose.shape == (3,) and np.all(np.abs(face.pose) <= np.pi)


def test_faces_are_sorted_and_compile_once_per_size_bucket(analyzer):
  faces = analyzer.analyze(_scene(1)[0])
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


def test_dplh_export_writes_the_params_alone_and_they_give_the_same_faces(
    workdir, analyzer, tmp_path):
  path = str(tmp_path / 'model.npz')
  out = _command('export', f'--workdir={workdir}', f'--out={path}',
                 cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert 'params of step 4 (epsilon=' in out.stdout
  with np.load(path, allow_pickle=False) as archive:
    names = archive.files
    meta = json.loads(str(archive['__meta__']))
  assert all(n.startswith('params/params/') for n in names
             if n != '__meta__')
  assert not any('opt_state' in n or 'noise' in n for n in names)
  # The tiny config sets noise_seed=0: the seed is the noise key.
  assert 'noise_seed' not in meta['config']
  assert 'sampler_seed' not in meta['config']
  assert 'data_dir' not in meta['config']
  assert meta['step'] == 4 and meta['privacy']['delta'] == 1e-5
  assert 'non_finite_examples_dropped' not in meta['privacy']
  shared = analyzer_lib.FaceAnalyzer.from_params_file(path, FAST)
  assert shared.describe()['epsilon'] == analyzer.describe()['epsilon']
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


def test_a_run_that_averages_its_params_releases_the_average(tmp_path):
  """ema_decay > 0: the analyzer and the export read ``averaged_params``
  (what the run evaluates), not the last step's params; a step-0
  checkpoint built by hand with an average unlike the params."""
  config = tiny.get_config()
  config.ema_decay = 0.5
  config_dict = json.loads(json.dumps(config.to_dict()))
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'config': config_dict}, f)
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  spec = train_step.StepSpec.from_config(config, model, weighting, 1.0)
  tx = train_step.make_optimizer(spec, noise_keys.secret_key(0)[0])
  average = jax.tree.map(lambda p: p + 1, params)
  state = train_step.TrainState(step=jnp.int32(0), params=params,
                                opt_state=tx.init(params),
                                averaged_params=average)
  checkpointer = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  checkpointer.save(0, state, {'config': config_dict})
  checkpointer.close()
  released = export.params_from_workdir(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, released.params, average)


def test_image_level_evaluation_counts_every_test_face(analyzer):
  source = image_eval.open_run_test_split(analyzer)  # the workdir's data_dir
  result = image_eval.evaluate(analyzer, source, num_images=3)
  faces = sum(len(source[i]['faces']['bbox']) for i in range(3))
  assert (result['num_images'], result['num_faces']) == (3, faces)
  assert 0 <= result['image_detection_ap'] <= 1
  panel = face_drawing.draw_faces(np.asarray(source[0]['image']),
                                  analyzer.analyze(source[0]['image']), 2)
  assert panel.size == (128, 128)


def _nan_as_none(metrics):
  return {k: None if isinstance(v, float) and math.isnan(v) else v
          for k, v in metrics.items()}


def test_training_ends_with_the_image_level_evaluation_dplh_evaluate_gives(
    trained_tiny, tmp_path):
  """config.image_eval_images=4: the run writes image_eval.json, which
  dplh-evaluate reproduces from the workdir (same params, images and
  options); a folder that is no run is refused in one line."""
  workdir = trained_tiny.workdir
  with open(os.path.join(workdir, image_eval.RESULT_FILE)) as f:
    saved = json.load(f)
  metrics = saved['metrics']
  assert metrics == _nan_as_none(trained_tiny.result['image_eval'])
  assert metrics['num_images'] == trained_tiny.config.image_eval_images == 4
  assert metrics['num_faces'] >= 1 and 0 <= metrics['image_detection_ap'] <= 1
  assert saved['model']['step'] == 4 and saved['model']['finished']
  assert saved['model']['epsilon'] == trained_tiny.result['privacy']['epsilon']
  out = _command('evaluate', f'--workdir={workdir}', '--num_images=4',
                 f'--json_out={tmp_path / "eval.json"}', cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert '| detection AP (whole images, IoU 0.5) |' in out.stdout
  assert f'4 test images, {metrics["num_faces"]} faces' in out.stdout
  with open(tmp_path / 'eval.json') as f:
    [model] = json.load(f)['models']
  assert _nan_as_none(model['metrics']) == metrics
  bad = _command('evaluate', f'--workdir={tmp_path}', cwd=tmp_path)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      f'error: {tmp_path} holds no config.json: pass the --workdir of a '
      'dplh-train run.']


def test_a_negative_image_eval_images_is_refused():
  config = tiny.get_config()
  config.image_eval_images = -1
  with pytest.raises(ValueError, match=r'config.image_eval_images=-1: must '
                     r'be >= 0'):
    config_validation.validate_config(config)


def test_dplh_analyze_writes_a_json_and_a_png_per_image(workdir, tmp_path):
  image = _scene(4)[0]
  Image.fromarray(image).save(tmp_path / 'photo.png')
  out = _command('analyze', f'--workdir={workdir}', str(tmp_path / 'photo.png'),
                 f'--out={tmp_path / "faces"}', '--min_score=0', '--scale=2',
                 cwd=tmp_path)
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
