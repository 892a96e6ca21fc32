"""DP-SGD on scikit-learn's digits with the dplh-jax core: copy and adapt.

An MLP 64-128-10 on the 8x8 digit images that scikit-learn ships (1,797
images, no download), trained with differentially private SGD at a target
epsilon, then evaluated on a held-out split. The privacy unit is one image.
The DP part is four calls:

1. ``dplh_jax.make_private``: calibrates sigma to the target epsilon for
   the planned steps and returns the transform (clip, noise, Adam), the
   Poisson sampler and the plan;
2. ``setup.batches(...)``: padded Poisson batches with their mask, for
   exactly the planned steps;
3. ``setup.clipped_grad_sum``: each image's gradient clipped to ``C`` and
   summed, the batch's padding rows masked;
4. ``setup.epsilon_spent(opt_state)``: the epsilon of the noise draws the
   optimizer state counts (``setup.init`` made it, once).

Run (``--target_epsilon 0`` trains the same model without DP)::

    python examples/digits_dp.py --target_epsilon 4

The split is fixed and public. By default initialization, the noise key and
the sampler are seeded from OS entropy. ``--seed`` makes a run reproducible,
and the printed line says so: a seeded noise key is public (whoever knows it
can subtract the noise), so the epsilon is then not a guarantee.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import model_selection

import dplh_jax

LAYER_SIZES = (64, 128, 10)


def load_digits(holdout: str = 'test'):
  """``(x_train, y_train, x_eval, y_eval)``: pixels scaled by the public
  constant 1/16 (no statistic of the private images), a fixed stratified 80/20
  split; ``holdout='validation'`` splits the training part again 80/20 and
  evaluates on that, to choose hyperparameters without the test split."""
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.2, stratify=y, random_state=0)
  if holdout == 'validation':
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x_train, y_train, test_size=0.2, stratify=y_train, random_state=1)
  elif holdout != 'test':
    raise ValueError(f"holdout must be 'test' or 'validation', got "
                     f'{holdout!r}.')
  return x_train, y_train, x_test, y_test


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
  """He-initialized dense layers (data-independent, so outside the clip)."""
  params = []
  for key, (fan_in, fan_out) in zip(
      jax.random.split(key, len(LAYER_SIZES) - 1),
      zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
    params.append({'w': jax.random.normal(key, (fan_in, fan_out))
                        * jnp.sqrt(2.0 / fan_in),
                   'b': jnp.zeros((fan_out,))})
  return params


def logits_of(params, x: jax.Array) -> jax.Array:
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  return x @ params[-1]['w'] + params[-1]['b']


def example_loss(params, example) -> jax.Array:
  """Cross-entropy of ONE image: the unit that is clipped."""
  logits = logits_of(params, example['x'])
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         example['y'])


def accuracy(params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(logits_of(params, x), -1) == y))


def _seeds(seed: int | None) -> tuple[jax.Array, int | None, int | None]:
  """Distinct streams for initialization, noise and sampling from one seed;
  with None, OS entropy for all three (noise and sampler then secret)."""
  if seed is None:
    init_seed = int(np.random.SeedSequence().generate_state(1)[0])
    return jax.random.key(init_seed), None, None
  noise_seed, sampler_seed = np.random.SeedSequence(seed).generate_state(2)
  return jax.random.key(seed), int(noise_seed), int(sampler_seed)


def main(target_epsilon: float | None = 4.0, *, epochs: float = 20.0,
         steps: int | None = None, expected_batch_size: int = 64,
         l2_norm_clip: float = 1.0, learning_rate: float = 1e-2,
         delta: float = 1e-5, accountant: str = 'pld',
         seed: int | None = None,
         holdout: str = 'test', verbose: bool = True) -> dict[str, Any]:
  """Trains the MLP, with DP unless ``target_epsilon`` is None (or 0).

  Args:
    target_epsilon: the budget at ``delta``; None or 0 trains without DP
      (same model, optimizer, Poisson batches and steps; no clip, no noise).
    epochs: passes over the training set (ignored when ``steps`` is given).
    steps: the number of steps, instead of ``epochs``.
    expected_batch_size: ``q * len(x_train)``.
    l2_norm_clip: the per-image clip norm ``C``.
    learning_rate: Adam's step size.
    delta: the target delta.
    accountant: ``'pld'`` (tight) or ``'rdp'`` (looser, faster to
      calibrate).
    seed: seeds initialization, the noise key and the sampler
      (reproducible, but the noise key is then public); None (default)
      draws all three from OS entropy.
    holdout: ``'test'`` or ``'validation'`` (see :func:`load_digits`).
    verbose: print the result.

  Returns:
    ``{'accuracy', 'epsilon', 'noise_multiplier', 'steps', 'seconds',
    'noise_seed_source'}``; epsilon is inf without DP, and
    ``noise_seed_source`` is ``'os_entropy'`` or ``'config_seed (not
    secret)'`` (None without DP).
  """
  start = time.time()
  x_train, y_train, x_eval, y_eval = load_digits(holdout)
  train = {'x': x_train, 'y': y_train}
  init_key, noise_seed, sampler_seed = _seeds(seed)
  params = init_mlp(init_key)
  optimizer = optax.adam(learning_rate)

  if target_epsilon:
    # 1. One call: calibrated transform, Poisson sampler, plan.
    setup = dplh_jax.make_private(
        num_examples=len(x_train), expected_batch_size=expected_batch_size,
        epochs=None if steps else epochs, steps=steps,
        target_epsilon=target_epsilon, delta=delta,
        l2_norm_clip=l2_norm_clip, optimizer=optimizer,
        accountant=accountant,
        noise_seed=noise_seed, sampler_seed=sampler_seed)
    # 3. Per-image gradients, clipped to C and summed; padding adds zero.
    grad_sum = setup.clipped_grad_sum(example_loss)

    @jax.jit
    def step(params, opt_state, batch):
      updates, opt_state = setup.tx.update(grad_sum(params, batch),
                                           opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    opt_state = setup.init(params)  # once per setup, on the host
    # 2. Padded Poisson batches with their mask, for the planned steps.
    for batch in setup.batches(train):
      params, opt_state = step(params, opt_state, batch)
    # 4. Epsilon of the noise draws the optimizer state counts.
    epsilon = setup.epsilon_spent(opt_state)
    sigma, num_steps = setup.noise_multiplier, setup.steps_taken(opt_state)
    noise_seed_source = setup.noise_seed_source
  else:
    sampler = dplh_jax.PoissonSampler(
        len(x_train), expected_batch_size, seed=sampler_seed)
    num_steps = steps or max(1, round(epochs / sampler.sampling_prob))

    @jax.jit
    def step(params, opt_state, batch):
      def mean_loss(params):
        losses = jax.vmap(example_loss, (None, 0))(params, batch.data)
        real = ~batch.is_padding_example
        return jnp.sum(jnp.where(real, losses, 0.0)) / jnp.maximum(
            jnp.sum(real), 1)
      updates, opt_state = optimizer.update(jax.grad(mean_loss)(params),
                                            opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for batch in dplh_jax.PaddedBatches(sampler, num_steps, arrays=train):
      params, opt_state = step(params, opt_state, batch)
    epsilon, sigma, noise_seed_source = float('inf'), 0.0, None

  result = {'accuracy': accuracy(params, x_eval, y_eval), 'epsilon': epsilon,
            'noise_multiplier': sigma, 'steps': num_steps,
            'seconds': time.time() - start,
            'noise_seed_source': noise_seed_source}
  if verbose:
    if not target_epsilon:
      privacy = 'non-private'
    else:
      secret = ('noise and sampler seeds from OS entropy'
                if noise_seed_source == 'os_entropy' else
                f'seed {seed} is public: reproducible, epsilon not a guarantee')
      privacy = (f'epsilon {epsilon:.3f} at delta {delta:g} (sigma '
                 f'{sigma:.3f}; {secret})')
    print(f'{holdout} accuracy {result["accuracy"]:.4f}, {privacy}, '
          f'{num_steps} steps, {result["seconds"]:.1f} s')
  return result


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--target_epsilon', type=float, default=4.0,
                      help='budget at --delta; 0 trains without DP')
  parser.add_argument('--epochs', type=float, default=20.0)
  parser.add_argument('--steps', type=int, default=None,
                      help='number of steps, instead of --epochs')
  parser.add_argument('--expected_batch_size', type=int, default=64)
  parser.add_argument('--l2_norm_clip', type=float, default=1.0)
  parser.add_argument('--learning_rate', type=float, default=1e-2)
  parser.add_argument('--delta', type=float, default=1e-5)
  parser.add_argument('--accountant', choices=('pld', 'rdp'), default='pld')
  parser.add_argument('--seed', type=int, default=None,
                      help='reproducible run (public noise key); default: '
                      'OS entropy')
  parser.add_argument('--holdout', choices=('test', 'validation'),
                      default='test')
  return parser.parse_args()


if __name__ == '__main__':
  args = _parse_args()
  main(args.target_epsilon, epochs=args.epochs, steps=args.steps,
       expected_batch_size=args.expected_batch_size,
       l2_norm_clip=args.l2_norm_clip, learning_rate=args.learning_rate,
       delta=args.delta, accountant=args.accountant, seed=args.seed,
       holdout=args.holdout)
