"""An attacker's check of the clipping guarantee on random models and inputs.

The guarantee of every clipping path (``per_example.clipped_grad_sum``,
``one_pass_clipping.clipped_grad_sum``) is that the clipped sum ``S`` moves by
at most ``C`` in L2 norm when one example is removed. Tests written with the
authors' code paths in mind missed three ways to break it (a dropout key
tied to the batch slot, ghost norms that underflow, layers the one-pass path
misreads), so this module searches for a violation the way a reviewer
would:

* random small Flax models: 1-D and 2-D convolutions of random kernel sizes,
  strides, dilations and paddings, biases on and off, LayerNorm or
  GroupNorm, dropout keyed by the example's identity, a dense head and a
  parameter outside any layer, several crops (rows) per example;
* random batches with adversarial examples: magnitudes from 1e-30 to 1e30 in
  the inputs and in the output gradients, near-cancelling rows, NaN or Inf
  in one example;
* every example removed both by masking it as padding and by deleting its
  row, on both paths, with and without microbatching.

:func:`worst_removal_ratio` returns ``max_i ||S(D) - S(D without i)|| / C``,
which must not exceed 1 (up to float32 rounding, 1e-4); with per-group
(``GroupClipNorms``) or adaptive (``ADAPTIVE``, a given ``clip_norm``)
clipping, ``C`` is the sum's sensitivity, and :func:`removal_ratios` also
gives each group's move over its ``C_g`` and the change of the unclipped
count that adaptive clipping noises.
``experiments/sensitivity_search.py`` runs many cases; the test suite runs a
fixed slice. Needs flax (the application extra).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dplh_jax.dp import clip_plan
from dplh_jax.dp import group_clipping
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example

PyTree = Any
CLIPPING_PATHS = {'vmap': per_example.clipped_grad_sum,
                  'one_pass': one_pass_clipping.clipped_grad_sum}
NUM_EXAMPLES = 4


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  features: int
  kernel: tuple[int, ...]
  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  padding: Any  # 'SAME', 'VALID', an int or explicit pairs
  use_bias: bool


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A random model; hashable, so equal specs share compiled functions."""
  input_shape: tuple[int, ...]  # (*spatial, channels) of one crop
  rows: int  # crops per example
  convs: tuple[ConvSpec, ...]
  norm: str  # 'none', 'layer' or 'group'
  dropout_rate: float
  dense_features: int
  dense_bias: bool
  extra_param: bool


class RandomNet(nn.Module):
  """``(rows, *spatial, channels) -> (rows, dense_features)``."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    for conv in self.spec.convs:
      x = nn.Conv(conv.features, conv.kernel, strides=conv.strides,
                  kernel_dilation=conv.dilation, padding=conv.padding,
                  use_bias=conv.use_bias)(x)
      x = nn.relu(x)
    if self.spec.norm == 'layer':
      x = nn.LayerNorm()(x)
    elif self.spec.norm == 'group':
      x = nn.GroupNorm(num_groups=1)(x)
    x = nn.Dropout(self.spec.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(self.spec.dense_features, use_bias=self.spec.dense_bias)(
        x.reshape(x.shape[0], -1))
    if self.spec.extra_param:
      x = x * self.param('gain', nn.initializers.ones,
                         (self.spec.dense_features,))
    return x


def example_loss(params, example, rng, *, model: RandomNet):
  """``sum(out * target)``: the output gradient is the target, so a batch
  sets the output-gradient magnitudes directly. Dropout is keyed by the
  example's own ``id`` (docs/DESIGN.md, Privacy rules, rule 8), never its slot."""
  out = model.apply(params, example['x'], deterministic=False,
                    rngs={'dropout': jax.random.fold_in(rng, example['id'])})
  return jnp.sum(out * example['target'])


def random_spec(rng: np.random.Generator) -> ModelSpec:
  """A random :class:`ModelSpec` whose convolutions all have outputs."""
  while True:
    spatial = int(rng.integers(1, 3))
    size = tuple(int(s) for s in rng.integers(5, 9, spatial))
    channels = int(rng.integers(1, 4))
    convs = []
    for _ in range(int(rng.integers(0, 3))):
      kernel = tuple(int(k) for k in rng.integers(1, 4, spatial))
      padding = [
          'SAME', 'VALID', 1,
          tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 2,
                                                              (spatial, 2)))
      ][int(rng.integers(0, 4))]
      convs.append(ConvSpec(
          int(rng.integers(1, 5)), kernel,
          tuple(int(s) for s in rng.integers(1, 3, spatial)),
          tuple(int(d) for d in rng.integers(1, 3, spatial)), padding,
          bool(rng.integers(0, 2))))
    spec = ModelSpec(
        size + (channels,), int(rng.integers(1, 4)), tuple(convs),
        ('none', 'layer', 'group')[int(rng.integers(0, 3))],
        float(rng.choice([0.0, 0.5])), int(rng.integers(1, 6)),
        bool(rng.integers(0, 2)), bool(rng.integers(0, 2)))
    try:
      jax.eval_shape(RandomNet(spec).init, jax.random.key(0),
                     jnp.zeros((spec.rows,) + spec.input_shape))
      return spec
    except (ValueError, TypeError, ZeroDivisionError):  # an empty output
      continue


def _magnitudes(rng: np.random.Generator) -> tuple[float, float]:
  """Powers of ten for an example's inputs and output gradients: ordinary;
  independent, anywhere in 1e-30..1e30; balanced, one huge and one tiny with
  a product near 1; or at the edge, where squares of the large factor still
  fit float32 (< 1.8e19) but squares of the small one underflow (< 1.1e-19)
  while their products stay ordinary (the review's attack on ghost norms)."""
  kind = rng.uniform()
  if kind < 0.15:
    return 0.0, 0.0
  if kind < 0.4:
    return tuple(rng.uniform(-30, 30, 2))
  if kind < 0.7:
    exponent = rng.uniform(-30, 30)
    return exponent, -exponent + rng.uniform(-2, 2)
  large, small = rng.uniform(18.0, 19.2), -rng.uniform(19.0, 20.0)
  return (large, small) if rng.uniform() < 0.5 else (small, large)


def random_batch(spec: ModelSpec, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
  """``NUM_EXAMPLES`` examples, most of them adversarial."""
  n, rows = NUM_EXAMPLES, spec.rows
  x = rng.normal(size=(n, rows) + spec.input_shape)
  target = rng.normal(size=(n, rows, spec.dense_features))
  for i in range(n):
    x_exponent, target_exponent = _magnitudes(rng)
    x[i] *= 10.0 ** x_exponent / np.sqrt(x[i].size)
    target[i] *= 10.0 ** target_exponent / np.sqrt(target[i].size)
    if rows > 1 and rng.uniform() < 0.3:  # rows that nearly cancel
      x[i, 1] = x[i, 0]
      target[i, 1] = -target[i, 0] * (1 + 1e-6 * rng.normal())
  if rng.uniform() < 0.5:  # one example with a NaN or Inf
    i = int(rng.integers(0, n))
    bad = float(rng.choice([np.nan, np.inf, -np.inf]))
    if rng.uniform() < 0.5:
      x[i].reshape(-1)[int(rng.integers(0, x[i].size))] = bad
    else:
      target[i].reshape(-1)[int(rng.integers(0, target[i].size))] = bad
  with np.errstate(over='ignore', under='ignore'):
    return {'x': x.astype(np.float32), 'target': target.astype(np.float32),
            'id': rng.permutation(1000)[:n].astype(np.int32)}


@functools.lru_cache(maxsize=64)
def _clipped_sum_fn(spec: ModelSpec, path: str,
                    l2_norm_clip: clip_plan.ClipSpec,
                    microbatch_size: int | None) -> Callable:
  clipped = CLIPPING_PATHS[path](
      functools.partial(example_loss, model=RandomNet(spec)), l2_norm_clip,
      microbatch_size=microbatch_size)
  # clip_norm is traced: an adaptive C changes without a new compile.
  return jax.jit(lambda params, batch, rng, padding, clip_norm: clipped(
      params, batch, rng, is_padding_example=padding, clip_norm=clip_norm))


def _distance(a, b) -> float:
  return float(np.sqrt(sum(
      np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def _unclipped(clipped) -> int:
  return int(clipped.num_examples - clipped.num_clipped
             - clipped.num_non_finite)


def removal_ratios(spec: ModelSpec, batch: dict[str, np.ndarray], path: str,
                   l2_norm_clip: clip_plan.ClipSpec = 1.0,
                   microbatch_size: int | None = None, seed: int = 0,
                   clip_norm: float | None = None,
                   same_shape: bool = False) -> dict[str, float]:
  """Worst moves of the clipped sum over every example ``i`` removed by
  masking (padding) and by deleting its row, relative to what they may be.

  With ``same_shape``, a deleted row is moved to the end as padding, so the
  later examples still change slots but the batch keeps its shape (one
  compile instead of two; what a padded Poisson batch does).

  Returns:
    ``'total'``: ``max_i ||S(D) - S(D - i)||`` over the sum's sensitivity
    (``C``, ``sqrt(sum_g C_g**2)``, or 1 for an adaptive sum in units of
    ``C``); ``'group <name>'`` (per-group clipping): the move restricted to
    the group over ``C_g``; ``'unclipped_count'``: the largest change of the
    count of real, finite, unclipped examples (at most 1).
  """
  model = RandomNet(spec)
  params = model.init(jax.random.key(seed), batch['x'][0])
  rng = jax.random.key(seed + 1)
  fn = _clipped_sum_fn(spec, path, l2_norm_clip, microbatch_size)
  if clip_norm is not None:
    clip_norm = np.float32(clip_norm)
  n = len(batch['id'])
  groups = {}
  if isinstance(l2_norm_clip, group_clipping.GroupClipNorms):
    leaf_groups, _ = l2_norm_clip.assign(params)
    for leaf, group in enumerate(leaf_groups):
      name, norm = l2_norm_clip.norms[group]
      groups.setdefault(name, (norm, []))[1].append(leaf)
  full = fn(params, batch, rng, np.zeros(n, bool), clip_norm)
  worst = {'total': 0.0, 'unclipped_count': 0.0} | {
      f'group {name}': 0.0 for name in groups}
  for i in range(n):
    masked = fn(params, batch, rng, np.arange(n) == i, clip_norm)
    if same_shape:
      order = [j for j in range(n) if j != i] + [i]
      deleted = fn(params, {k: v[order] for k, v in batch.items()}, rng,
                   np.arange(n) == n - 1, clip_norm)
    else:
      deleted = fn(params, {k: np.delete(v, i, axis=0)
                            for k, v in batch.items()},
                   rng, np.zeros(n - 1, bool), clip_norm)
    for removed in (masked, deleted):
      worst['total'] = max(worst['total'], _distance(
          full.grad_sum, removed.grad_sum) / full.l2_norm_clip)
      worst['unclipped_count'] = max(worst['unclipped_count'], abs(
          _unclipped(full) - _unclipped(removed)))
      leaves_full = jax.tree.leaves(full.grad_sum)
      leaves_removed = jax.tree.leaves(removed.grad_sum)
      for name, (norm, members) in groups.items():
        worst[f'group {name}'] = max(worst[f'group {name}'], _distance(
            [leaves_full[j] for j in members],
            [leaves_removed[j] for j in members]) / norm)
  return worst


def worst_removal_ratio(spec: ModelSpec, batch: dict[str, np.ndarray],
                        path: str, l2_norm_clip: clip_plan.ClipSpec,
                        microbatch_size: int | None = None,
                        seed: int = 0, clip_norm: float | None = None
                        ) -> float:
  """``max_i ||S(D) - S(D - i)|| / sensitivity`` over every example ``i``,
  removing it both by masking (padding) and by deleting its row."""
  return removal_ratios(spec, batch, path, l2_norm_clip, microbatch_size,
                        seed, clip_norm)['total']


def random_group_clip_norms(params: PyTree, rng: np.random.Generator
                            ) -> group_clipping.GroupClipNorms:
  """A random grouping of ``params`` (by leaf name, by module, or at random
  per leaf) with clip norms from 1e-3 to 1e2."""
  paths = group_clipping.leaf_paths(params)
  kind = int(rng.integers(0, 3))
  if kind == 0:
    def group_of(path):
      return path[-1]
  elif kind == 1:
    def group_of(path):
      return '/'.join(path[:-1])
  else:
    chosen = {path: f'g{int(rng.integers(0, 3))}' for path in paths}

    def group_of(path):
      return chosen[path]
  names = sorted({group_of(path) for path in paths})
  return group_clipping.GroupClipNorms.from_function(
      group_of, {name: float(10.0 ** rng.integers(-3, 3)) for name in names})


def random_case(seed: int) -> tuple[ModelSpec, dict[str, np.ndarray], float,
                                    int | None]:
  """``(spec, batch, C, microbatch_size)`` of case ``seed``."""
  rng = np.random.default_rng(seed)
  spec = random_spec(rng)
  batch = random_batch(spec, rng)
  return (spec, batch, float(rng.choice([1e-3, 1e-2, 1.0, 1e2])),
          [None, 2][int(rng.integers(0, 2))])
