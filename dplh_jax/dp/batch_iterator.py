"""Poisson-sampled, padded batches with their mask, for a fixed number of steps.

:class:`PaddedBatches` is the safe path from a dataset to the clipping: it
draws each step's Poisson sample from a
:class:`~dplh_jax.dp.batch_selection.PoissonSampler`, reads only the sampled
examples, and yields a :class:`SampledBatch` (padding rows all zeros,
``is_padding_example`` beside them, and the draw's number), so user code
never holds the raw padded indices, whose padding slots (-1) would read the
last example as data (docs/DESIGN.md, Privacy rules 2).

Two kinds of data:

* ``arrays``: a pytree of arrays sharing a leading example axis (read with
  :func:`~dplh_jax.dp.batch_selection.gather_padded`);
* ``source``: any random-access dataset, ``len(source)`` examples and
  ``source[i]`` one example (a pytree of arrays or numbers); only sampled
  examples are read, stacked, and padding slots filled with zeros of the
  example's shape and dtype.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import jax
import numpy as np

from dplh_jax.dp import batch_selection

PyTree = Any


class SampledBatch(NamedTuple):
  """One step's padded Poisson batch, numbered by its draw.

  A pytree of arrays, so a jitted step takes it as one argument.

  Attributes:
    data: the gathered pytree of arrays, leading axis the padded batch; real
      rows first, padding rows all zeros.
    is_padding_example: bool ``(padded length,)``, True at padding rows; the
      clipping must see it (``PrivateSetup.clipped_grad_sum`` passes it).
    step: int32 scalar, the draw's number (0 for the sampler's first
      sample); ``make_private``'s transform releases an update only for the
      draw whose number is its count of noise draws.
    num_real_examples: int32 scalar, the real rows (the sample's size);
      ``make_private``'s transform refuses a clipped sum that counts other
      than these (an unmasked one counts the padding rows).
  """

  data: Any
  is_padding_example: np.ndarray
  step: np.ndarray
  num_real_examples: np.ndarray


class PaddedBatches(Iterator[SampledBatch]):
  """Yields one padded Poisson batch per step until ``num_steps`` are drawn.

  Guarantee: the real rows of step ``t``'s batch are exactly the examples of
  the sampler's ``t``-th Poisson sample (each example included independently
  with probability ``q``, none dropped, none duplicated; the sampler's
  guarantee), in increasing index order, and every other row is padding:
  all zeros and marked True in ``is_padding_example``. Only sampled examples
  are read. The iterator stops once the sampler has drawn ``num_steps``
  samples in all, so a loop over it runs at most the steps the privacy plan
  paid for. A batch whose sample exceeds the sampler's ``padded_batch_size``
  spans several chunks of that size (rare: probability about 1e-3 per step
  by default); it is still one step, with one noisy update.

  Batches are a deterministic function of the sampler's seed. To resume
  without ``make_private``, save :meth:`state_dict` with the model and
  restore it with :meth:`load_state_dict`: the remaining batches are the
  ones the first run would have drawn. (``make_private``'s setup saves and
  checks the sampler with the optimizer state instead:
  ``PrivateSetup.state_dict``.)

  >>> sampler = batch_selection.PoissonSampler(
  ...     6, expected_batch_size=2, seed=0, padded_batch_size=4)
  >>> batches = PaddedBatches(sampler, num_steps=3,
  ...                         arrays={'x': np.arange(1.0, 7.0)})
  >>> len(batches)
  3
  >>> first = next(batches)
  >>> first.data['x'].shape, first.is_padding_example.dtype, int(first.step)
  ((4,), dtype('bool'), 0)
  >>> bool((first.data['x'][first.is_padding_example] == 0).all())
  True
  >>> len(list(batches))  # the two steps left
  2
  """

  def __init__(self, sampler: batch_selection.PoissonSampler, num_steps: int,
               *, arrays: PyTree = None, source: Any = None,
               example_spec: PyTree = None):
    """Creates the iterator.

    Args:
      sampler: the Poisson sampler; its ``num_examples`` must be the data's.
        The iterator draws from it, so it counts steps across resumes.
      num_steps: total samples to draw (the plan's steps), counting those the
        sampler drew before (``sampler.steps_sampled``).
      arrays: pytree of arrays with a leading example axis; or
      source: a random-access dataset (``len`` and ``__getitem__``).
      example_spec: with ``source``, the shape and dtype of one example (a
        pytree of ``jax.ShapeDtypeStruct`` or arrays); by default the first
        sampled example's. Give it when a step may sample nothing before
        any example was read (expected batch sizes below about 10).

    Raises:
      ValueError: unless exactly one of ``arrays`` and ``source`` is given,
        if its number of examples is not the sampler's, or if ``num_steps``
        is not a positive int.
    """
    if (arrays is None) == (source is None):
      raise ValueError('Give exactly one of arrays= (a pytree of arrays with '
                       'a leading example axis) and source= (len and '
                       '__getitem__).')
    if isinstance(num_steps, bool) or not isinstance(
        num_steps, (int, np.integer)) or num_steps < 1:
      raise ValueError(f'num_steps must be a positive int, got {num_steps!r}.')
    if arrays is not None:
      if example_spec is not None:
        raise ValueError('example_spec= goes with source=; arrays= have '
                         'their own shapes.')
      # Host copies once, not one device-to-host copy per step.
      arrays = jax.tree.map(np.asarray, arrays)
      sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
               for leaf in jax.tree.leaves(arrays)}
      if len(sizes) != 1 or None in sizes:
        raise ValueError(f'Every array needs the same leading example axis; '
                         f'got sizes {sorted(map(str, sizes))}.')
      num_examples = sizes.pop()
    else:
      num_examples = len(source)
    if num_examples != sampler.num_examples:
      raise ValueError(
          f'The data has {num_examples} examples but the sampler samples '
          f'from {sampler.num_examples}; build the sampler (or make_private) '
          'with num_examples=len(data), or examples would never be drawn.')
    self.sampler = sampler
    self.num_steps = int(num_steps)
    self._arrays = arrays
    self._source = source
    self._example_spec = None if example_spec is None else _spec_of(
        example_spec)

  def __len__(self) -> int:
    """Steps left to draw."""
    return max(0, self.num_steps - self.sampler.steps_sampled)

  def __iter__(self) -> PaddedBatches:
    return self

  def __next__(self) -> SampledBatch:
    if self.sampler.steps_sampled >= self.num_steps:
      raise StopIteration
    sample = self.sampler.sample()
    step = np.asarray(self.sampler.steps_sampled - 1, np.int32)
    if self._arrays is not None:
      batch = batch_selection.gather_padded(self._arrays, sample)
    else:
      batch = self._gather_source(sample, step)
    num_real = np.asarray(np.sum(~np.asarray(batch.is_padding_example)),
                          np.int32)
    return SampledBatch(batch.data, batch.is_padding_example, step, num_real)

  def state_dict(self) -> dict[str, Any]:
    """JSON-serializable state: the sampler's, and the step count."""
    return {'num_steps': self.num_steps,
            'sampler': self.sampler.state_dict()}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores :meth:`state_dict`; the plan's step count must match."""
    if state['num_steps'] != self.num_steps:
      raise ValueError(
          f'The saved iterator planned {state["num_steps"]} steps, this one '
          f'{self.num_steps}; a resumed run must follow the same plan.')
    self.sampler.load_state_dict(state['sampler'])

  def _gather_source(self, sample: batch_selection.SampledIndices,
                     step: np.ndarray) -> batch_selection.PaddedBatch:
    is_padding = np.asarray(sample.is_padding_example, bool)
    real = np.flatnonzero(~is_padding)
    examples = [self._source[int(i)] for i in sample.indices[real]]
    for example in examples:
      spec = _spec_of(example)
      if self._example_spec is None:
        self._example_spec = spec  # the first sampled example's
      elif spec != self._example_spec:
        raise ValueError(
            f'source example of step {int(step)} has shapes and dtypes '
            f'{spec}, not {self._example_spec}; make every example one shape '
            'and dtype (or fix example_spec=).')
    if self._example_spec is None:
      raise ValueError(
          f'Step {int(step)} sampled no example and none was read before, '
          'so the padding rows have no shape: pass example_spec= (a pytree '
          'of jax.ShapeDtypeStruct) to PaddedBatches or setup.batches.')

    def stack(leaf_spec, *rows):
      out = np.zeros((len(is_padding),) + leaf_spec.shape, leaf_spec.dtype)
      if rows:
        out[real] = np.stack([np.asarray(r) for r in rows])
      return out

    data = jax.tree.map(stack, self._example_spec, *examples)
    return batch_selection.PaddedBatch(data, is_padding)


def _spec_of(example: PyTree) -> PyTree:
  """The pytree of ``jax.ShapeDtypeStruct`` of one example (arrays, numbers
  or structs)."""
  def leaf_spec(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype))
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(leaf_spec, example)
