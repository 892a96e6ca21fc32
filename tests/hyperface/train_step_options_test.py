"""The train step's public options: learning-rate schedules and the
parameter average."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.hyperface import train_step


def _spec(schedule, warmup, num_steps=100, rate=0.01):
  return train_step.StepSpec(
      model=None, weighting=None, dp=True, l2_norm_clip=1.0,
      noise_multiplier=1.0, expected_batch_size=8.0, optimizer='adam',
      learning_rate=rate, momentum=0.9, microbatch_size=None,
      clipping='one_pass', learning_rate_schedule=schedule,
      warmup_steps=warmup, num_steps=num_steps)


def test_constant_without_warmup_is_the_plain_rate():
  assert train_step.learning_rate(_spec('constant', 0)) == 0.01


def test_warmup_rises_linearly_then_holds():
  rate = train_step.learning_rate(_spec('constant', 10))
  np.testing.assert_allclose([rate(0), rate(5), rate(10), rate(99)],
                             [0.0, 0.005, 0.01, 0.01], rtol=1e-6)


def test_cosine_peaks_after_warmup_and_reaches_zero_at_the_last_step():
  rate = train_step.learning_rate(_spec('cosine', 10, num_steps=110))
  np.testing.assert_allclose([rate(0), rate(10), rate(60), rate(110)],
                             [0.0, 0.01, 0.005, 0.0], rtol=1e-6, atol=1e-9)


def test_cosine_without_steps_after_warmup_says_how_to_fix_it():
  with pytest.raises(ValueError, match=r'config.warmup_steps=100: .* plans '
                     '100; lower warmup_steps'):
    train_step.learning_rate(_spec('cosine', 100, num_steps=100))


def test_the_average_forgets_the_start_then_follows_with_the_decay():
  start = {'w': jnp.zeros(3)}
  state = train_step.initial_state(start, opt_state=(), ema_decay=0.9)
  assert state.averaged_params['w'] is not state.params['w']  # donated apart
  ones = {'w': jnp.ones(3)}
  # Step 0: rate min(0.9, 1/10) = 0.1, so 90% of the new params at once.
  first = train_step.averaged(state.averaged_params, ones, jnp.int32(0), 0.9)
  np.testing.assert_allclose(first['w'], 0.9, rtol=1e-6)
  # Late steps: the configured decay.
  late = train_step.averaged(first, {'w': jnp.full(3, 2.0)}, jnp.int32(1000),
                             0.9)
  np.testing.assert_allclose(late['w'], 0.9 * 0.9 + 0.1 * 2.0, rtol=1e-6)
  assert train_step.evaluated_params(
      state.replace(averaged_params=late)) is late


def test_without_an_average_the_last_params_are_evaluated():
  state = train_step.initial_state({'w': jnp.zeros(3)}, (), ema_decay=0.0)
  assert state.averaged_params is None
  assert train_step.evaluated_params(state) is state.params


def test_a_clipped_sum_wrapper_wraps_the_dp_sum_and_needs_a_dp_step():
  wrapped = []  # what the wrapper is given: the step's clipped-sum function
  train_step.make_train_step(
      _spec('constant', 0),
      clipped_sum_wrapper=lambda fn: wrapped.append(fn) or fn)
  assert len(wrapped) == 1 and callable(wrapped[0])
  with pytest.raises(ValueError, match='clipped_sum_wrapper needs a DP step'):
    train_step.make_train_step(
        dataclasses.replace(_spec('constant', 0), dp=False),
        clipped_sum_wrapper=lambda fn: fn)
