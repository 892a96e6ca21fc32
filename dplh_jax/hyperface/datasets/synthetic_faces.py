"""`synthetic_faces`: procedurally rendered faces for offline DP training.

Needs no download: every image is rendered with NumPy from (seed, split,
index) by synthetic_scene, so a config always yields identical images and
labels. Schema: face_schema (bbox pixel [x, y, w, h]).

    import dplh_jax.hyperface.datasets  # registers the builders
    builder = tfds.builder('synthetic_faces/demo', data_dir=...)
    builder.download_and_prepare()
    source = builder.as_data_source()['train']   # random access

Configs: ``tiny`` (tests: 24 + 8 images of 64 px) and ``demo`` (20,000 +
2,000 images of 112 px; DP utility grows with the number of examples).
Other sizes or seeds: pass ``config=SyntheticFacesConfig(...)``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from dplh_jax.hyperface.datasets import face_schema
from dplh_jax.hyperface.datasets import synthetic_scene

_SPLIT_IDS = {'train': 0, 'test': 1}
_CHUNK = 250  # images per worker task


@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """Size, seed and look of a synthetic_faces variant."""
  scene: synthetic_scene.SceneConfig = synthetic_scene.SceneConfig()
  num_train: int = 1000
  num_test: int = 200
  seed: int = 0


def _render_range(config: SyntheticFacesConfig, split: str, start: int,
                  stop: int) -> list[tuple[int, dict]]:
  """Renders images [start, stop) of a split as TFDS (key, example) pairs."""
  examples = []
  for index in range(start, stop):
    image, faces = synthetic_scene.render_scene(
        config.seed, _SPLIT_IDS[split], index, config.scene)
    examples.append((index, {
        'image': synthetic_scene.encode_jpeg(image, config.scene.jpeg_quality),
        'image_id': f'{split}/{index:06d}',
        'faces': faces,
    }))
  return examples


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
  """Synthetic multi-face images with landmarks, visibility, pose, gender."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Stronger gender cues (lipstick, beard, hair length, brow and '
               'lip sizes), visible in 48 px crops.',
  }
  BUILDER_CONFIGS = [
      SyntheticFacesConfig(
          name='tiny', description='24 + 8 images of 64 px, for tests.',
          scene=synthetic_scene.SceneConfig(image_size=64, max_faces=2),
          num_train=24, num_test=8),
      SyntheticFacesConfig(
          name='demo', description='20,000 + 2,000 images of 112 px.',
          scene=synthetic_scene.SceneConfig(image_size=112),
          num_train=20_000, num_test=2_000),
      # Another seed: the same law, other images. Stand-ins for public data
      # to pre-train on before DP training on 'tiny' / 'demo'.
      SyntheticFacesConfig(
          name='tiny_public', description="'tiny' rendered from seed 1.",
          scene=synthetic_scene.SceneConfig(image_size=64, max_faces=2),
          num_train=24, num_test=8, seed=1),
      SyntheticFacesConfig(
          name='demo_public', description="'demo' rendered from seed 1.",
          scene=synthetic_scene.SceneConfig(image_size=112),
          num_train=20_000, num_test=2_000, seed=1),
  ]
  DEFAULT_CONFIG_NAME = 'demo'

  # TFDS 4.9.10 locates a packaged builder through the undeclared
  # `importlib_resources` package; pointing at this file avoids needing it.
  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """Same arguments as any TFDS builder, plus the rendering parallelism.

    Args:
      num_workers: rendering processes (forked); default: all CPUs for sets
        of 1,000 images or more, else render in this process.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder`; ``file_format``
        defaults to array_record (random access, no TensorFlow needed).
    """
    self._num_workers = num_workers
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return face_schema.face_dataset_info(
        self, __doc__, seed=self.builder_config.seed,
        gender_label_noise=self.builder_config.scene.gender_label_noise)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train),
            'test': self._generate_examples('test', config.num_test)}

  def _generate_examples(self, split: str, num_images: int):
    workers = self._num_workers
    if workers is None:
      workers = (os.cpu_count() or 1) if num_images >= 1000 else 1
    chunks = [(start, min(start + _CHUNK, num_images))
              for start in range(0, num_images, _CHUNK)]
    config = self.builder_config
    if workers <= 1 or 'fork' not in multiprocessing.get_all_start_methods():
      for start, stop in chunks:
        yield from _render_range(config, split, start, stop)
      return
    # Fork, not spawn: spawn re-runs an unguarded calling script. Workers only
    # use NumPy and PIL, so forking a process that imported JAX is harmless.
    context = multiprocessing.get_context('fork')
    with concurrent.futures.ProcessPoolExecutor(workers,
                                                mp_context=context) as pool:
      starts, stops = zip(*chunks)
      for examples in pool.map(_render_range, [config] * len(chunks),
                               [split] * len(chunks), starts, stops):
        yield from examples
