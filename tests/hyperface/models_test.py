"""Tests of dplh_jax.hyperface.models: shapes, parameter count, per-example structure."""

import dataclasses
import math

import flax.linen as nn

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.hyperface import models

SMALL = models.HyperFaceConfig.small()
NUM_PROPOSALS = 3
# Exact parameter count of the paper network (227x227 input, no grouped
# convolutions), including the 5 learned log sigma^2 task weights:
# 33,821,318 network weights + 5.
PAPER_PARAM_COUNT = 33_821_323


def _abstract_init(model, config, num_proposals=1):
  crops = jax.ShapeDtypeStruct(
      (num_proposals, config.input_size, config.input_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), crops), crops


def test_paper_config_parameter_count_without_compute():
  variables, _ = _abstract_init(models.HyperFace(), models.HyperFaceConfig())
  assert models.count_params(variables) == PAPER_PARAM_COUNT
  # The log sigma^2 vector is a trainable parameter, one entry per task.
  assert variables['params'][models.LOG_SIGMA_SQ].shape == (5,)
  no_weights, _ = _abstract_init(
      models.HyperFace(learn_task_weights=False), models.HyperFaceConfig())
  assert models.count_params(no_weights) == PAPER_PARAM_COUNT - 5


def test_paper_config_layer_shapes_follow_design_table():
  variables, _ = _abstract_init(models.HyperFace(), models.HyperFaceConfig())
  trunk = variables['params'][models.TRUNK]
  kernels = {name: trunk[name]['kernel'].shape for name in trunk}
  assert kernels == {
      'conv1': (11, 11, 3, 96), 'conv1a': (4, 4, 96, 256),
      'conv2': (5, 5, 96, 256), 'conv3': (3, 3, 256, 384),
      'conv3a': (2, 2, 384, 256), 'conv4': (3, 3, 384, 384),
      'conv5': (3, 3, 384, 256), 'conv_all': (1, 1, 768, 192),
      'fc_full': (6 * 6 * 192, 3072)}
  for task in models.TASK_NAMES:
    head = variables['params'][f'{task}_head']
    assert head['hidden']['kernel'].shape == (3072, 512)
    assert head['output']['kernel'].shape == (
        512, models.TASK_OUTPUT_SIZES[task])


@pytest.mark.parametrize('config', [models.HyperFaceConfig(), SMALL],
                         ids=['paper227', 'small64'])
def test_head_shapes(config):
  model = models.HyperFace(config)
  variables, crops = _abstract_init(model, config, NUM_PROPOSALS)
  outputs = jax.eval_shape(model.apply, variables, crops)
  assert {task: out.shape for task, out in outputs.items()} == {
      'detection': (NUM_PROPOSALS, 2), 'landmarks': (NUM_PROPOSALS, 42),
      'visibility': (NUM_PROPOSALS, 21), 'pose': (NUM_PROPOSALS, 3),
      'gender': (NUM_PROPOSALS, 2)}


@pytest.mark.parametrize('input_size,conv1_kernel,conv1_stride', [
    (227, 11, 4), (64, 5, 2), (96, 7, 3), (128, 11, 4), (48, 3, 1), (80, 5, 2)])
def test_fusion_maps_line_up_for_many_inputs(input_size, conv1_kernel,
                                             conv1_stride):
  config = models.HyperFaceConfig(input_size=input_size, width_multiplier=0.1,
                                  conv1_kernel=conv1_kernel,
                                  conv1_stride=conv1_stride)
  geometry = models.trunk_geometry(config)
  conv1a = (geometry.max1_size - geometry.conv1a_kernel) // (
      geometry.conv1a_stride) + 1
  conv3a = (geometry.max2_size - geometry.conv3a_kernel) // (
      geometry.conv3a_stride) + 1
  assert conv1a == conv3a == geometry.pool5_size >= 1
  # The real module agrees: conv_all's input width is the three concatenated
  # maps and fc_full sees pool5_size^2 * conv_all filters.
  variables, _ = _abstract_init(models.HyperFace(config), config)
  trunk = variables['params'][models.TRUNK]
  assert trunk['conv_all']['kernel'].shape[2] == 3 * config.width(256)
  assert trunk['fc_full']['kernel'].shape[0] == (
      geometry.pool5_size ** 2 * config.width(192))


def test_small_config_geometry_is_as_documented():
  g = models.trunk_geometry(SMALL)
  assert (g.conv1_size, g.max1_size, g.max2_size, g.pool5_size) == (
      30, 14, 6, 2)
  assert (g.conv1a_kernel, g.conv1a_stride, g.conv3a_kernel,
          g.conv3a_stride) == (7, 7, 3, 3)


def test_too_small_input_and_wrong_crop_size_raise():
  with pytest.raises(ValueError, match='pool5'):
    models.trunk_geometry(models.HyperFaceConfig(input_size=64))
  with pytest.raises(ValueError, match='expected crops'):
    models.HyperFace(SMALL).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_group_norm_is_optional_and_per_crop():
  config = models.HyperFaceConfig(input_size=64, width_multiplier=0.125,
                                  conv1_kernel=5, conv1_stride=2,
                                  group_norm_groups=4)
  variables, _ = _abstract_init(models.HyperFace(config), config)
  trunk = variables['params'][models.TRUNK]
  assert 'conv1_norm' in trunk and 'conv_all_norm' in trunk
  plain, _ = _abstract_init(models.HyperFace(SMALL), SMALL)
  assert not any(name.endswith('_norm') for name in plain['params']['trunk'])
  # No BatchNorm anywhere: nothing but 'params' is created.
  assert set(variables) == set(plain) == {'params'}


@pytest.fixture(scope='module')
def small_model():
  model = models.HyperFace(SMALL)
  crops = np.random.default_rng(1).uniform(
      size=(2, NUM_PROPOSALS, 64, 64, 3)).astype(np.float32)
  variables = models.init_variables(model, seed=0)

  @jax.jit
  def forward(variables, crops, dropout_key):
    # vmap over images exactly as per_example_grads does; with a None-like
    # key we run deterministically.
    def one_image(image_crops, key):
      return model.apply(variables, image_crops, deterministic=False,
                         rngs={'dropout': key})
    keys = jax.random.split(dropout_key, crops.shape[0])
    stochastic = jax.vmap(one_image)(crops, keys)
    deterministic = jax.vmap(
        lambda c: model.apply(variables, c, deterministic=True))(crops)
    return stochastic, deterministic

  return model, variables, crops, forward


def test_small_forward_is_finite_and_shaped(small_model):
  model, variables, crops, forward = small_model
  _, outputs = forward(variables, crops, jax.random.key(2))
  for task in models.TASK_NAMES:
    assert outputs[task].shape == (2, NUM_PROPOSALS,
                                   models.TASK_OUTPUT_SIZES[task])
    assert np.all(np.isfinite(outputs[task]))
  assert models.count_params(variables) == models.count_params(
      _abstract_init(model, SMALL)[0])


def test_dropout_needs_its_key_and_changes_outputs(small_model):
  _, variables, crops, forward = small_model
  first, deterministic = forward(variables, crops, jax.random.key(2))
  again, deterministic_again = forward(variables, crops, jax.random.key(2))
  other, _ = forward(variables, crops, jax.random.key(3))
  np.testing.assert_array_equal(deterministic['pose'],
                                deterministic_again['pose'])
  np.testing.assert_array_equal(first['pose'], again['pose'])
  assert not np.allclose(first['pose'], other['pose'])
  assert not np.allclose(first['pose'], deterministic['pose'])


def test_no_mixing_across_images_or_proposals(small_model):
  _, variables, crops, forward = small_model
  _, base = forward(variables, crops, jax.random.key(2))
  # Change image 1 entirely and proposal 0 of image 0: image 0's other
  # proposals must not move.
  changed = crops.copy()
  changed[1] = np.random.default_rng(9).normal(size=crops[1].shape)
  changed[0, 0] = 0.0
  _, moved = forward(variables, changed, jax.random.key(2))
  for task in models.TASK_NAMES:
    np.testing.assert_allclose(moved[task][0, 1:], base[task][0, 1:],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(moved[task][1], base[task][1])


def test_host_init_matches_flax_init_tree_and_distribution():
  config = dataclasses.replace(SMALL, group_norm_groups=4)
  model = models.HyperFace(config)
  host = models.init_variables(model, seed=0)
  abstract, _ = _abstract_init(model, config)
  as_struct = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  assert as_struct(host) == as_struct(abstract)
  params = host['params']
  np.testing.assert_array_equal(params[models.LOG_SIGMA_SQ], np.zeros(5))
  np.testing.assert_array_equal(params['trunk']['conv2']['bias'], 0.0)
  np.testing.assert_array_equal(params['trunk']['conv2_norm']['scale'], 1.0)
  # Kernels: Flax's default lecun_normal, compared on the same shape. Both
  # have std sqrt(1/fan_in) and are truncated at 2 of the untruncated std.
  kernel = params['trunk']['conv4']['kernel']  # (3, 3, 48, 48): 20736 draws
  flax_kernel = nn.initializers.lecun_normal()(jax.random.key(0), kernel.shape)
  target_std = math.sqrt(1.0 / (3 * 3 * 48))
  for draws in (kernel, flax_kernel):
    # 20736 draws: the std's standard error is ~0.5%; allow 3%.
    np.testing.assert_allclose(np.std(draws), target_std, rtol=0.03)
    assert np.max(np.abs(draws)) <= 2 * target_std / 0.8796 + 1e-6
  assert not np.allclose(models.init_variables(model, seed=1)['params'][
      'trunk']['conv4']['kernel'], kernel)


def test_count_params_counts_every_scalar():
  tree = {'a': jnp.zeros((2, 3)), 'b': {'c': jnp.zeros(4)}}
  assert models.count_params(tree) == 10 == math.prod((2, 3)) + 4
