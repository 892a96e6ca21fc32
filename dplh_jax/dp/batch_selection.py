"""Poisson batch selection with fixed padded shapes.

DP-SGD's accounting (``PoissonSampledDpEvent``) assumes every example is
included in every step independently with probability ``q``. This module
samples exactly that, and pads the result to a fixed shape so the jitted train
step compiles once, not once per realized batch size.
"""

import math
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import stats

PADDING_INDEX = -1


class SampledIndices(NamedTuple):
  """One step's Poisson sample, padded.

  .. warning::
    Never index data with ``indices`` directly: a padding slot holds -1,
    which NumPy reads as the last example (and ``jnp.take`` clamps), so a
    step that forgets ``is_padding_example`` silently trains on duplicates
    of real examples. Use :func:`gather_padded`, which zeroes padding rows
    and returns the mask with them.

  Attributes:
    indices: int64 array of length ``num_chunks * padded_batch_size``; the
      sampled indices in increasing order, then ``PADDING_INDEX`` (-1) slots.
    is_padding_example: bool array of the same length; True at padding slots,
      which must not be read from the data source and must contribute zero.
  """

  indices: np.ndarray
  is_padding_example: np.ndarray


def default_padded_batch_size(
    num_examples: int, sampling_prob: float, overflow_probability: float = 1e-3
) -> int:
  """The smallest multiple of 8 that a Poisson sample exceeds with probability
  at most ``overflow_probability`` (an overflowing step takes a second chunk)."""
  quantile = stats.binom.ppf(1.0 - overflow_probability, num_examples,
                             sampling_prob)
  return max(8, int(math.ceil(quantile / 8.0)) * 8)


class PoissonSampler:
  """Samples each index independently with probability ``q`` at every step.

  Guarantee: the set of real indices in a step is exactly a Poisson sample
  with rate ``q = expected_batch_size / num_examples``: nothing sampled is
  dropped, nothing is duplicated. When a sample is larger than
  ``padded_batch_size``, the step spans several chunks of that size (so the
  returned length is a multiple of ``padded_batch_size``), and the train step
  must process all of them before adding noise once. The number of distinct
  shapes in a run is therefore tiny (1, rarely 2), so a jitted step compiles
  at most a few times.

  Amplification by sampling assumes the adversary does not know which
  examples were sampled: by default the generator is seeded from OS entropy.
  A ``seed`` makes a run reproducible; then keep the seed secret.

  >>> sampler = PoissonSampler(1000, expected_batch_size=10, seed=0)
  >>> sampler.sampling_prob, sampler.padded_batch_size
  (0.01, 24)
  >>> batch = sampler.sample()
  >>> batch.indices.shape == batch.is_padding_example.shape == (24,)
  True
  >>> bool(((batch.indices == -1) == batch.is_padding_example).all())
  True
  """

  def __init__(
      self,
      num_examples: int,
      expected_batch_size: float,
      *,
      seed: int | None = None,
      padded_batch_size: int | None = None,
  ):
    """Creates the sampler.

    Args:
      num_examples: Size of the private dataset (public).
      expected_batch_size: ``q * num_examples``; must be in (0, num_examples].
      seed: Seed for reproducible runs; None seeds from OS entropy.
      padded_batch_size: Chunk size; by default the 99.9% quantile of the
        batch size, rounded up to a multiple of 8.
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
      raise ValueError(
          f'num_examples must be a positive int, got {num_examples!r}.')
    if not 0 < expected_batch_size <= num_examples:
      raise ValueError(
          f'expected_batch_size must be in (0, num_examples={num_examples}], '
          f'got {expected_batch_size!r} (sampling rate q = '
          f'{expected_batch_size / num_examples:.4g}).')
    self.num_examples = int(num_examples)
    self.expected_batch_size = float(expected_batch_size)
    self.sampling_prob = self.expected_batch_size / self.num_examples
    if padded_batch_size is None:
      padded_batch_size = default_padded_batch_size(self.num_examples,
                                                    self.sampling_prob)
    if not isinstance(padded_batch_size, (int, np.integer)) or (
        padded_batch_size < 1):
      raise ValueError(f'padded_batch_size must be a positive int, got '
                       f'{padded_batch_size!r}.')
    self.padded_batch_size = int(padded_batch_size)
    self.steps_sampled = 0
    self._rng = np.random.default_rng(
        np.random.SeedSequence() if seed is None else seed)

  def sample(self) -> SampledIndices:
    """Draws the next step's Poisson sample, padded to whole chunks."""
    selected = np.flatnonzero(
        self._rng.random(self.num_examples) < self.sampling_prob)
    self.steps_sampled += 1
    return self.pad(selected)

  def pad(self, selected: np.ndarray) -> SampledIndices:
    """Pads sorted indices to ``ceil(len / padded_batch_size)`` chunks (>= 1)."""
    num_chunks = max(1, -(-len(selected) // self.padded_batch_size))
    length = num_chunks * self.padded_batch_size
    indices = np.full((length,), PADDING_INDEX, dtype=np.int64)
    indices[:len(selected)] = selected
    return SampledIndices(indices, indices == PADDING_INDEX)

  def state_dict(self) -> dict[str, Any]:
    """JSON-serializable state; restoring it reproduces the future batches."""
    return {
        'num_examples': self.num_examples,
        'expected_batch_size': self.expected_batch_size,
        'padded_batch_size': self.padded_batch_size,
        'steps_sampled': self.steps_sampled,
        'bit_generator_state': self._rng.bit_generator.state,
    }

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores :meth:`state_dict`; the sampling configuration must match."""
    for name in ('num_examples', 'expected_batch_size', 'padded_batch_size'):
      if state[name] != getattr(self, name):
        raise ValueError(
            f'Sampler state has {name}={state[name]!r} but this sampler has '
            f'{getattr(self, name)!r}; a resumed run must sample as before.')
    self._rng.bit_generator.state = state['bit_generator_state']
    self.steps_sampled = int(state['steps_sampled'])


def process_share(sample: SampledIndices, process_index: int,
                  num_processes: int) -> np.ndarray:
  """The real indices of ``sample`` that process ``process_index`` owns.

  Process ``p`` of ``P`` owns the indices ``i`` with ``i % P == p``: the
  shares are disjoint and cover the dataset, so each sampled index is trained
  on by exactly one process, and the union of the shares is ``sample``
  itself (nothing dropped, nothing duplicated).

  Guarantee: inclusion is independent per index, so a process's share is a
  Poisson sample at rate ``q`` of the indices it owns, and conversely the
  union of disjoint per-process Poisson samples at rate ``q`` is exactly one
  Poisson sample at rate ``q`` of the whole dataset: the law of a union of
  independent Bernoulli(q) coins over disjoint sets is that of one coin per
  index. That holds whether the processes draw their coins from one shared
  generator (as ``train`` does, so that every process knows every share's
  size and pads to one shape without communicating) or from independent ones.

  >>> sample = PoissonSampler(10, 5, seed=0, padded_batch_size=8).pad(
  ...     np.array([1, 2, 5, 8]))
  >>> process_share(sample, 0, 2), process_share(sample, 1, 2)
  (array([2, 8]), array([1, 5]))

  Args:
    sample: one step's padded Poisson sample of the whole dataset.
    process_index: this process, in ``[0, num_processes)``.
    num_processes: the number of processes training together.

  Returns:
    The owned sampled indices, in increasing order.
  """
  if not 0 <= process_index < num_processes:
    raise ValueError(f'process_index={process_index} must be in [0, '
                     f'num_processes={num_processes}).')
  real = np.asarray(sample.indices)[~np.asarray(sample.is_padding_example)]
  return real[real % num_processes == process_index]


class PaddedBatch(NamedTuple):
  """A gathered batch: ``data`` rows at real slots, zeros at padding slots.

  Attributes:
    data: the gathered pytree of arrays, leading axis the padded batch.
    is_padding_example: bool ``(padded length,)``; pass it to the clipping
      (``clip_and_sum``, ``clipped_grad_sum`` or ``dp_aggregate``).
  """

  data: Any
  is_padding_example: np.ndarray


def gather_padded(arrays: Any, sample: SampledIndices) -> PaddedBatch:
  """The rows of ``arrays`` that ``sample`` selected, padded with zeros.

  Contract: row ``j`` of every leaf is ``leaf[sample.indices[j]]`` where
  ``sample.is_padding_example[j]`` is False, and all zeros where it is True
  (padding slots are never read); the mask comes back with the data, so the
  two cannot be separated by accident. Padding rows still must be masked:
  zero inputs do not give zero gradients.

  >>> sampler = PoissonSampler(5, expected_batch_size=2, seed=0,
  ...                          padded_batch_size=4)
  >>> batch = gather_padded({'x': np.arange(5.0) + 1}, sampler.pad(
  ...     np.array([1, 3])))
  >>> batch.data['x'], batch.is_padding_example
  (array([2., 4., 0., 0.]), array([False, False,  True,  True]))

  Args:
    arrays: pytree of arrays sharing a leading example axis.
    sample: a step's :class:`SampledIndices`.

  Raises:
    ValueError: if the leaves disagree on the number of examples, or a real
      slot's index is outside it.
  """
  leaves = jax.tree.leaves(arrays)
  sizes = {np.shape(leaf)[0] for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(f'Every array needs the same number of examples (leading '
                     f'axis); got {sorted(sizes)}.')
  num_examples = sizes.pop()
  is_padding = np.asarray(sample.is_padding_example, bool)
  real = np.flatnonzero(~is_padding)
  indices = np.asarray(sample.indices)[real]
  if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
    raise ValueError(f'Sampled indices {indices.min()}..{indices.max()} lie '
                     f'outside the {num_examples} examples; was the sampler '
                     'built for another dataset?')

  def gather(leaf):
    leaf = np.asarray(leaf)
    out = np.zeros((len(is_padding),) + leaf.shape[1:], leaf.dtype)
    out[real] = leaf[indices]
    return out

  return PaddedBatch(jax.tree.map(gather, arrays), is_padding)
