"""make_private: sigma calibrated to the target, epsilon read from the noise
draws, one state per setup, only planned, in-order, masked updates of this
run released (none under vmap), and a resume refused unless the run, the
plan, the state and the sampler agree."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dplh_jax.dp import accounting
from dplh_jax.dp import batch_selection
from dplh_jax.dp import dp_transform
from dplh_jax.dp import per_example
from dplh_jax.dp import privacy_plan
from dplh_jax.dp import privacy_report
from dplh_jax.dp import private_setup

_PARAMS = {'w': jnp.zeros(3)}
_X = np.arange(300, dtype=np.float32).reshape(100, 3) / 300 + 1


def _loss(params, x):
  return jnp.sum((params['w'] - x) ** 2)


# One compiled clipping for every test; setup.clipped_grad_sum is this plus
# the batch's mask and draw number (checked in the masking test).
_CLIP = jax.jit(per_example.clipped_grad_sum(_loss, 1.0))


def _summed(batch):
  return private_setup.StepClippedSum(
      _CLIP(_PARAMS, batch.data, is_padding_example=batch.is_padding_example),
      jnp.asarray(batch.step), jnp.asarray(batch.num_real_examples))


def _setup(sigma=1.0, steps=5, *, target_epsilon=2.0, delta=1e-5,
           l2_norm_clip=1.0, num_examples=100, expected_batch_size=10.0,
           accountant='rdp', noise_seed=7, sampler_seed=0):
  """A setup with a given sigma (no calibration: fast); n = 100, q = 0.1."""
  return private_setup.PrivateSetup(
      optimizer=optax.sgd(0.1),
      plan=privacy_plan.PrivacyPlan(sigma, expected_batch_size / num_examples,
                                    steps, steps),
      delta=delta, target_epsilon=target_epsilon, l2_norm_clip=l2_norm_clip,
      expected_batch_size=expected_batch_size, accountant=accountant,
      num_examples=num_examples, noise_seed=noise_seed,
      sampler_seed=sampler_seed, padded_batch_size=None)


def _updater(setup):
  return jax.jit(lambda state, summed: setup.tx.update(summed, state,
                                                       _PARAMS))


def _key(state):
  return np.asarray(jax.random.key_data(dp_transform.dp_state(state).noise_key))


def test_sigma_is_the_smallest_within_the_target_for_steps_and_epochs():
  kw = dict(num_examples=1000, expected_batch_size=10, target_epsilon=2.0,
            delta=1e-5, l2_norm_clip=1.0, optimizer=optax.sgd(0.1),
            accountant='rdp')
  setup = private_setup.make_private(steps=50, **kw)
  sigma, q = setup.noise_multiplier, setup.plan.sampling_prob
  assert (q, setup.num_steps) == (0.01, 50)
  assert accounting.epsilon(sigma, q, 50, 1e-5, 'rdp') <= 2.0
  # Calibration's bracket is 0.1% wide: 0.2% less noise exceeds the target.
  assert accounting.epsilon(sigma * 0.998, q, 50, 1e-5, 'rdp') > 2.0
  # 0.5 epochs at q = 0.01 are the same 50 steps (privacy_plan's path).
  by_epochs = private_setup.make_private(epochs=0.5, **kw)
  assert by_epochs.plan == privacy_plan.PrivacyPlan(sigma, q, 50, 50)
  assert by_epochs.noise_seed_source == 'os_entropy'


def test_updates_are_dp_aggregate_and_epsilon_composes_the_draws_that_ran():
  setup = _setup(sigma=1.0, steps=5)
  update = _updater(setup)
  state = setup.init(_PARAMS)
  assert setup.epsilon_spent(state) == 0.0
  by_hand = optax.chain(dp_transform.dp_aggregate(1.0, 1.0, 10, key=7),
                        optax.sgd(0.1))
  hand_state, hand_update = by_hand.init(_PARAMS), jax.jit(by_hand.update)
  for batch in list(setup.batches(_X))[:3]:
    updates, state = update(state, _summed(batch))
    expected, hand_state = hand_update(_summed(batch).clipped_sum,
                                       hand_state, _PARAMS)
    # The same noise draw; a 1-ulp float32 difference between compilations.
    np.testing.assert_allclose(updates['w'], expected['w'], rtol=1e-6)
    assert np.all(updates['w'] != 0)
  assert setup.steps_taken(state) == 3
  expected = accounting.epsilon(1.0, 0.1, 3, 1e-5, 'rdp')
  assert setup.epsilon_spent(state) == expected
  report = setup.report(state)
  assert report['steps'] == 3 and report['epsilon'] == expected
  assert report['updates_refused_past_plan'] == 0
  assert privacy_report.recompute_epsilon(report) == pytest.approx(
      expected, rel=1e-9)
  assert report['noise_seed_source'] == 'config_seed (not secret)'


def test_past_the_plan_nothing_is_drawn_or_released():
  # F5: the plan's 2 steps ran; a loop that steps once more gets zeros.
  setup = _setup(steps=2)
  update = _updater(setup)
  state = setup.init(_PARAMS)
  batches = list(setup.batches(_X))
  assert len(batches) == 2 and list(setup.batches(_X)) == []
  with pytest.raises(ValueError, match="plan's 2 steps are drawn"):
    setup.sampler.sample()
  for batch in batches:
    _, state = update(state, _summed(batch))
  key = _key(state)
  extra = batches[-1]._replace(step=np.int32(2))
  for batch in (extra, batches[-1]):
    updates, state = update(state, _summed(batch))
    assert not np.any(updates['w'])
  np.testing.assert_array_equal(_key(state), key)  # no noise drawn
  assert int(state.refused_past_plan) == 2
  assert setup.steps_taken(state) == 2
  assert setup.epsilon_spent(state) == accounting.epsilon(1.0, 0.1, 2, 1e-5,
                                                          'rdp')
  assert setup.report(state)['updates_refused_past_plan'] == 2


def test_one_state_per_setup_made_on_the_host():
  # F3: a jitted or abstract init could hand out states sharing a key.
  setup = _setup()
  with pytest.raises(ValueError, match='under jit, eval_shape or vmap'):
    jax.jit(setup.tx.init)(_PARAMS)
  with pytest.raises(ValueError, match='under jit, eval_shape or vmap'):
    jax.eval_shape(setup.init, _PARAMS)
  with pytest.raises(ValueError, match='under jit, eval_shape or vmap'):
    jax.jit(lambda: setup.tx.init({'w': np.zeros(3, np.float32)}))()
  abstract = setup.abstract_state(_PARAMS)  # counts nothing
  state = setup.init(_PARAMS)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  with pytest.raises(ValueError, match='reuse the noise key'):
    setup.init(_PARAMS)
  with pytest.raises(ValueError, match='reuse the noise key'):
    setup.tx.init(_PARAMS)


def test_tx_takes_only_masked_clipped_sums_of_its_batches():
  # F4: without the mask, padding rows count as data (sensitivity 2C).
  setup = _setup()
  state = setup.init(_PARAMS)
  batch = next(setup.batches(_X))
  per_example_grads = {'w': jnp.asarray(batch.data)}
  with pytest.raises(ValueError, match='setup.tx takes setup.clipped_grad'):
    setup.tx.update(per_example_grads, state, _PARAMS,
                    is_padding_example=batch.is_padding_example)
  with pytest.raises(ValueError, match='setup.tx takes setup.clipped_grad'):
    setup.tx.update(_summed(batch).clipped_sum, state, _PARAMS)
  grad_sum = jax.jit(setup.clipped_grad_sum(lambda p, x: p['w'] @ (1.0 - x)))
  with pytest.raises(ValueError, match='takes a SampledBatch'):
    grad_sum(_PARAMS, batch_selection.PaddedBatch(batch.data,
                                                  batch.is_padding_example))
  # A zero (padding) row has gradient 1 - 0 = 1: it must contribute 0.
  one_real = batch._replace(
      data=np.zeros((8, 3), np.float32) + np.eye(8, 3, dtype=np.float32) * 3,
      is_padding_example=np.arange(8) > 0, num_real_examples=np.int32(1))
  summed = grad_sum(_PARAMS, one_real)
  assert int(summed.clipped_sum.num_examples) == 1
  assert (int(summed.step), int(summed.num_real_examples)) == (0, 1)
  # The real row's gradient 1 - [3, 0, 0], clipped to norm 1.
  np.testing.assert_allclose(summed.clipped_sum.grad_sum['w'],
                             np.array([-2.0, 1, 1]) / np.sqrt(6), rtol=1e-6)


def test_state_and_sampler_out_of_step_release_nothing_and_are_refused():
  # F2 (a): a re-initialized state fed the next batch of a restored sampler;
  # F1 in jit: a state of another plan (sigma 1) fed to this one (sigma 0.5).
  setup, first = _setup(sigma=0.5), _setup(sigma=1.0)
  update = _updater(setup)
  batches = [next(setup.batches(_X)) for _ in range(2)]
  for state, batch in ((setup.init(_PARAMS), batches[1]),
                       (first.init(_PARAMS), batches[0])):
    key = _key(state)
    updates, state = update(state, _summed(batch))
    assert not np.any(updates['w'])
    np.testing.assert_array_equal(_key(state), key)  # no noise drawn
    assert int(state.refused_mismatched) == 1
    assert int(dp_transform.dp_state(state).num_updates) == 0
  with pytest.raises(ValueError, match='1 updates were refused'):
    first.epsilon_spent(state)
  with pytest.raises(ValueError, match='setup.load_state_dict'):
    setup.sampler.load_state_dict(setup.sampler.state_dict())


def test_checkpoint_taken_anywhere_in_the_loop_resumes_the_same_releases():
  # F2 (b): a checkpoint after next() drew batch 2 but before its update.
  first = _setup(noise_seed=None, sampler_seed=None)
  update = _updater(first)
  state = first.init(_PARAMS)
  initial = jax.device_get(state)
  used = []  # (batch, noise key) of each update
  for t, batch in enumerate(first.batches(_X)):
    if t == 2:
      saved = jax.device_get(state), json.loads(json.dumps(
          first.state_dict(state)))
    used.append((batch, _key(state)))
    _, state = update(state, _summed(batch))
    if t == 3:
      break  # killed
  # A new process: same settings, fresh entropy, restored state and record.
  resumed = _setup(noise_seed=None, sampler_seed=None)
  with pytest.raises(ValueError, match='is not the one this record'):
    resumed.load_state_dict(initial, saved[1])  # a state of another step
  resumed.load_state_dict(*saved)
  assert resumed.steps_taken(saved[0]) == 2
  assert resumed.noise_seed_source == 'os_entropy'
  # Batch 2 again, under the key it had: the same release, not a new one.
  batch = next(resumed.batches(_X))
  old_batch, old_key = used[2]
  assert int(batch.step) == 2
  np.testing.assert_array_equal(batch.is_padding_example,
                                old_batch.is_padding_example)
  np.testing.assert_array_equal(batch.data, old_batch.data)
  np.testing.assert_array_equal(_key(saved[0]), old_key)
  with pytest.raises(ValueError, match='before setup.init'):
    other = _setup()
    other.init(_PARAMS)
    other.load_state_dict(*saved)


def test_unmasked_sum_in_a_step_clipped_sum_releases_nothing():
  # Review 2 F7: a hand-built StepClippedSum around an unmasked sum counts
  # the padding rows (sensitivity 2C): refused inside jit, and counted.
  setup = _setup()
  state = setup.init(_PARAMS)
  batch = next(setup.batches(_X))
  assert int(batch.num_real_examples) < len(batch.is_padding_example)
  no_mask = np.zeros_like(batch.is_padding_example)  # every row counts
  unmasked = private_setup.StepClippedSum(
      _CLIP(_PARAMS, batch.data, is_padding_example=no_mask),
      jnp.asarray(batch.step), jnp.asarray(batch.num_real_examples))
  updates, state = _updater(setup)(state, unmasked)
  assert not np.any(updates['w'])
  assert int(state.refused_mismatched) == 1
  assert int(dp_transform.dp_state(state).num_updates) == 0


def test_a_state_of_another_run_with_the_same_settings_releases_nothing():
  # Review 2 F1 (and F6): two runs of identical settings and seeds; run A's
  # state fed to run B would draw A's noise on B's batch.
  first, second = _setup(), _setup()
  state = first.init(_PARAMS)
  batch = next(second.batches(_X))
  key = _key(state)
  updates, state = _updater(second)(state, _summed(batch))
  assert not np.any(updates['w'])
  np.testing.assert_array_equal(_key(state), key)  # no noise drawn
  assert int(state.refused_mismatched) == 1
  with pytest.raises(ValueError, match="not this run's"):
    second.epsilon_spent(state)


def test_resume_with_a_record_of_another_run_or_plan_is_refused():
  # Review 2 F2: run A's state with run B's record (same settings, same
  # step); F6: A's record with its plan edited to B's sigma.
  runs = [_setup(sigma=sigma, noise_seed=None, sampler_seed=None)
          for sigma in (1.0, 1.0, 2.0)]
  states = [run.init(_PARAMS) for run in runs]
  records = [json.loads(json.dumps(run.state_dict(state)))
             for run, state in zip(runs, states)]
  edited = dict(records[0], plan=records[2]['plan'])
  for sigma, record in ((1.0, records[1]), (2.0, edited)):
    with pytest.raises(ValueError, match='or another run'):
      _setup(sigma=sigma).load_state_dict(states[0], record)


def test_update_under_vmap_is_refused_when_traced():
  # Review 2 F4: an ensemble vmapped over one state would release every
  # member with the same noise, inside jit or around it.
  setup = _setup()
  state = setup.init(_PARAMS)
  summed = _summed(next(setup.batches(_X)))
  ensemble = {'w': jnp.zeros((2, 3))}
  step = lambda p, o, s: setup.tx.update(s, o, p)
  for vmapped in (jax.jit(jax.vmap(step, in_axes=(0, None, None))),
                  jax.vmap(jax.jit(step), in_axes=(0, None, None))):
    with pytest.raises(ValueError, match='under jax.vmap'):
      vmapped(ensemble, state, summed)


@pytest.mark.parametrize('changed, field', [
    (dict(sigma=0.5), 'noise_multiplier'),
    (dict(target_epsilon=8.0), 'target_epsilon'),
    (dict(steps=6), 'num_steps'),
    (dict(delta=1e-6), 'delta'),
    (dict(accountant='pld'), 'accountant'),
    (dict(l2_norm_clip=2.0), 'l2_norm_clip'),
    (dict(num_examples=200, expected_batch_size=20.0), 'num_examples'),
    (dict(expected_batch_size=20.0), 'sampling_prob'),
])
def test_resume_under_another_plan_is_refused_naming_the_field(changed, field):
  # F1: resuming at another sigma would account every step at the new one.
  first = _setup()
  state = first.init(_PARAMS)
  record = json.loads(json.dumps(first.state_dict(state)))
  other = _setup(**changed)
  with pytest.raises(ValueError, match=f'made with {field}='):
    other.load_state_dict(state, record)
  with pytest.raises(ValueError, match="not this run's"):
    other.steps_taken(state)


@pytest.mark.parametrize('kw, match', [
    (dict(steps=5, epochs=1.0), 'exactly one of epochs and steps'),
    (dict(), 'exactly one of epochs and steps'),
    (dict(steps=0), 'steps must be a positive int'),
    (dict(steps=2.5), 'steps must be a positive int'),
    (dict(epochs=-1.0), 'epochs must be > 0'),
    (dict(steps=5, target_epsilon=0.0), 'target_epsilon must be > 0'),
    (dict(steps=5, expected_batch_size=2000), 'expected_batch_size must be'),
    # F8: delta >= 1/n allows publishing an example outright.
    (dict(steps=5, delta=1e-3), r'delta=0.001 must be in \(0, 1/num_examples'),
    (dict(steps=5, delta=0.5), r'delta=0.5 must be in \(0, 1/num_examples'),
])
def test_bad_arguments_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    private_setup.make_private(**(dict(
        num_examples=1000, expected_batch_size=10, target_epsilon=2.0,
        delta=1e-5, l2_norm_clip=1.0, optimizer=optax.sgd(0.1)) | kw))
