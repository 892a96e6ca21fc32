"""Per-example clipped gradient sums in one forward and one backward pass.

:func:`dplh_jax.dp.per_example.clipped_grad_sum` differentiates each example
with respect to every parameter under ``jax.vmap``. On XLA:CPU, vmap turns
each convolution's weight gradient into a batch-grouped convolution that runs
several times slower than the plain one, and the per-example gradients of
large dense layers are materialized in full.

This module computes the same :class:`dp_transform.ClippedSum` the
"book-keeping" way (Bu, Wang, Zha and Karypis, "Differentially private
optimization on large model at small cost", ICML 2023). For every
``nn.Dense`` and ``nn.Conv`` layer (exactly those types):

1. Under ``jax.vmap`` over examples, each example's loss is differentiated
   with respect to a zero "tap" added to every layer's output ``z`` (through
   ``flax.linen.intercept_methods``; the model is unchanged), giving
   ``delta = dL_i/dz``, while the layer's input ``a`` is recorded. No weight
   gradient is formed, so vmap adds a batch axis to activations only, never to
   kernels. Parameters outside those layers (HyperFace's learned log sigma^2,
   norm layers' scales) get ordinary per-example gradients in the same pass.
2. Example ``i``'s kernel gradient is ``sum_t a_t delta_t^T`` over its rows
   ``t`` (its crops, and for a conv every output position with ``a_t`` its
   im2col patch). Its squared norm comes from that materialized gradient or,
   when cheaper, from Gram matrices without forming it (the "ghost norm"):
   ``sum_{t,s} (a_t . a_s)(delta_t . delta_s)``, plus a bound on the float32
   rounding of both that sum and the contributed sum (below).
3. ``clip_plan`` (``clip_norms.group_clip_factors``, the rule the vmap path
   uses too) turns the norms, combined per clip group (one group unless
   ``l2_norm_clip`` is a ``GroupClipNorms``; a kernel and its bias may be in
   different groups), into clip scales, and the clipped sum is
   ``sum_i scale_i G_i`` (materialized) or ``sum_t a_t (scale delta)_t^T``
   (ghost).

Guarantee: the same as ``dp_transform.clip_and_sum``, sensitivity ``C``
(``sqrt(sum_g C_g**2)`` per group, 1 in units of ``C`` when adaptive).
Example ``i`` is in its own vmap lane, so ``a`` and ``delta`` of its rows
depend on it alone. Where the gradient is materialized, the norm and the
contribution are the same array. Where it is not, the norm used is an upper
bound on the contribution's norm: the Gram sum can cancel catastrophically
in float32 (rows that nearly cancel give ~0 or even a negative value), so
``gamma * M^2`` and ``gamma_c * M`` are added with ``M = sum_t |a_t||delta_t|``
>= ``|G|`` and ``gamma``, ``gamma_c`` twice the first-order float32 error
constants of the two computations. Padding and non-finite examples get scale
0 and are selected away with ``where`` before the weighted sums.

Not supported, and refused with the layer named (``one_pass_probe``): a
layer parameter read more than once (tied weights, weight penalties), read
through a custom derivative, transformed on its way to the layer, or a
Dense / Conv with a custom contraction; layers inside lifted transforms
(``nn.scan``, ``nn.remat``...) fail with an error.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from dplh_jax.dp import clip_norms
from dplh_jax.dp import clip_plan
from dplh_jax.dp import dp_transform
from dplh_jax.dp import one_pass_probe
from dplh_jax.dp import per_example

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST
# Twice float32's unit roundoff (2**-24): slack for the error bounds below.
_ROUNDING = 2.0**-23
# Exactly these types: a subclass may compute something else in __call__, so
# it is left to ordinary autodiff like any other layer.
_LAYER_TYPES = one_pass_probe.LAYER_TYPES


@dataclasses.dataclass(frozen=True)
class _LayerGrad:
  """Per-example statistics of one layer's gradient.

  Attributes:
    part_norms: ``{'kernel': ..., 'bias': ...}``, ``(B,)`` norms (or upper
      bounds) of each example's kernel and bias contributions. A NaN/Inf in
      the example's inputs or output gradients at this layer makes the
      kernel's mantissa NaN/Inf (``inf * 0`` is NaN), which is how
      non-finite examples are found without another pass.
    part_sums: ``{name: factors} -> {'kernel': ..., 'bias': ...}`` weighted
      sums, each part with its own group's factors.
  """
  part_norms: dict[str, clip_norms.ScaledNorm]
  part_sums: Callable[[dict[str, clip_norms.ClipFactors]],
                      dict[str, jax.Array]]

  @property
  def norm(self) -> clip_norms.ScaledNorm:
    """The norm of kernel and bias together."""
    return clip_norms.combine_norms(list(self.part_norms.values()))

  def clipped_sum(self, factors: clip_norms.ClipFactors
                  | dict[str, clip_norms.ClipFactors]) -> dict[str, jax.Array]:
    """Weighted sums with one ``factors`` for both parts, or one per part."""
    if isinstance(factors, clip_norms.ClipFactors):
      factors = {name: factors for name in self.part_norms}
    return self.part_sums(factors)


def _scaled_rows(a: jax.Array, delta: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rows rescaled by powers of two so that no product or square underflows.

  Example ``b``'s gradient is ``sum_t a_t delta_t^T``. Each row pair is
  written ``2**k_t * ahat_t dhat_t^T`` with ``ahat``, ``dhat`` of largest
  magnitude in [0.5, 1), and ``k_t`` folded into ``a`` relative to the
  example's largest ``k``: ``G_b = 2**top_b * sum_t atilde_t dhat_t^T``. The
  largest row then has ``|atilde_t| |dhat_t| >= 1/4``, so a Gram sum or a
  rounding bound built from these rows cannot flush to zero while the
  contribution stays large (as ``|delta_t|^2 ~ 1e-38`` does unscaled).

  Returns:
    ``(atilde, dhat, top)``: ``(B, T, n)``, ``(B, T, o)``, ``(B,)`` int32.
  """
  peak_a = jnp.max(jnp.abs(a), axis=2)
  peak_d = jnp.max(jnp.abs(delta), axis=2)
  exp_a, exp_d = clip_norms.exponent_of(peak_a), clip_norms.exponent_of(peak_d)
  has_product = (peak_a > 0) & (peak_d > 0)
  row_exp = jnp.where(has_product, exp_a + exp_d, clip_norms.ZERO_EXPONENT)
  top = jnp.max(row_exp, axis=1)
  # Rows without a product (a or delta zero) add nothing; NaN still spreads.
  a_shift = jnp.where(has_product, row_exp - top[:, None] - exp_a, 0)
  return (clip_norms.times_pow2(a, a_shift[..., None]),
          clip_norms.times_pow2(delta, -exp_d[..., None]), top)


def _example_scaled(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(x * 2**-e, e)``, ``e`` per example (leading axis) such that the
  example's largest magnitude becomes [0.5, 1) (``clip_norms.exponent_of``;
  exact, a power of two). A NaN/Inf example is left as it is."""
  exponent = clip_norms.exponent_of(clip_norms.row_peaks([x]))
  return clip_norms.times_pow2(
      x, -exponent.reshape((-1,) + (1,) * (x.ndim - 1))), exponent


def _matrix_grad(a: jax.Array, delta: jax.Array, to_kernel: Callable,
                 use_bias: bool, a_exponent: jax.Array | None = None
                 ) -> _LayerGrad:
  """Per-example gradient of ``z_t = a_t @ W (+ b)`` from ``(B, T, n)`` inputs
  and ``(B, T, o)`` output gradients; ``to_kernel`` maps ``(n, o)`` to the
  kernel's layout. With ``a_exponent`` (``(B,)`` int32), ``a`` is the input
  already scaled by ``2**-a_exponent`` (``_example_scaled``)."""
  a, delta = a.astype(jnp.float32), delta.astype(jnp.float32)
  rows, fan_in = a.shape[1:]
  fan_out = delta.shape[2]
  prescaled = a_exponent is not None
  if not prescaled:
    a_exponent = jnp.zeros(a.shape[:1], jnp.int32)
  if use_bias:
    bias_norm, (bias_grads,), bias_exponent = clip_norms.scaled_norms(
        [jnp.sum(delta, 1)])

  if rows * (fan_in + fan_out) < fan_in * fan_out:
    # Ghost norm: T x T Gram matrices instead of n x o gradients. Rows are
    # scaled one by one: the Gram sum and its rounding bound must not flush
    # to zero while the contribution stays large.
    a_rows, d_rows, top = _scaled_rows(a, delta)
    top = top + a_exponent
    gram_a = jnp.einsum('btn,bsn->bts', a_rows, a_rows, precision=_HIGHEST)
    gram_d = jnp.einsum('bto,bso->bts', d_rows, d_rows, precision=_HIGHEST)
    ghost = jnp.sum(gram_a * gram_d, axis=(1, 2))
    # M = sum_t |a_t| |delta_t| bounds |G| and every term's magnitude. The
    # Gram sum is off by at most ~(n + o + T^2) u M^2 and the contributed
    # einsum by ~T u M (u = 2**-24, first order), so this bounds the norm
    # of what is actually added, even when rows cancel.
    row_norms = jnp.sqrt(jnp.diagonal(gram_a, axis1=1, axis2=2)
                         * jnp.diagonal(gram_d, axis1=1, axis2=2))
    total = jnp.sum(row_norms, axis=1)
    gamma = (fan_in + fan_out + rows * rows + 4) * _ROUNDING
    gamma_contribution = (rows + 2) * _ROUNDING
    bound = (jnp.sqrt(jnp.maximum(ghost, 0.0) + gamma * jnp.square(total))
             + gamma_contribution * total)  # NaN/Inf stay non-finite
    kernel_norm = clip_norms.normalized(bound, top)

    def kernel_sum(factors: clip_norms.ClipFactors) -> jax.Array:
      # In units of the largest contribution (<= C): at C ~ 1e-30 the row
      # products would be subnormal, and flushing some of one example's T
      # rows can undo a cancellation among them (|sum| > its bound).
      unit = factors.largest_contribution_exponent()
      keep = factors.keep[:, None, None]
      scaled = (factors.scale_times_pow2(top - unit)[:, None, None]
                * jnp.where(keep, d_rows, 0.0))
      return clip_norms.times_pow2(
          jnp.einsum('btn,bto->no', jnp.where(keep, a_rows, 0.0), scaled,
                     precision=_HIGHEST), unit)
  else:
    # One power-of-two scale per example, not per row: the norm is that of
    # the very array added, so whatever flushes to zero is lost from both
    # (products below 2**-126 of the example's peak input times its peak
    # output gradient: only a spread past float32's range loses gradient).
    # The scale keeps the products from overflowing: entries are at most T
    # in magnitude, times 2**top.
    if prescaled:
      a_rows = a
    else:
      a_rows, a_exponent = _example_scaled(a)
    d_rows, d_exponent = _example_scaled(delta)
    top = a_exponent + d_exponent
    # (B, o, n), not (B, n, o): XLA:CPU runs this contraction 2x faster.
    grads = jnp.einsum('bto,btn->bon', d_rows, a_rows, precision=_HIGHEST)
    grads_norm, (grads,), exponent = clip_norms.scaled_norms([grads])
    kernel_norm = clip_norms.ScaledNorm(grads_norm.mantissa,
                                        top + grads_norm.exponent)
    # A finite example whose products all flushed to zero adds nothing; its
    # unclipped weight 2**(top + exponent) may overflow to inf (inf * 0 = NaN).
    sum_exponent = jnp.where(grads_norm.mantissa == 0,
                             clip_norms.ZERO_EXPONENT, top + exponent)

    def kernel_sum(factors: clip_norms.ClipFactors) -> jax.Array:
      return factors.weighted_sum(grads, sum_exponent).T

  def part_sums(factors):
    sums = {'kernel': to_kernel(kernel_sum(factors['kernel']))}
    if use_bias:
      sums['bias'] = factors['bias'].weighted_sum(bias_grads, bias_exponent)
    return sums

  norms = {'kernel': kernel_norm}
  if use_bias:
    norms['bias'] = bias_norm
  return _LayerGrad(norms, part_sums)


def _dense_grad(module: nn.Dense, a: jax.Array, delta: jax.Array
                ) -> _LayerGrad:
  """``a``, ``delta``: ``(B, ..., n)``, ``(B, ..., o)``, B examples."""
  num_examples, fan_in, fan_out = a.shape[0], a.shape[-1], delta.shape[-1]
  return _matrix_grad(a.reshape(num_examples, -1, fan_in),
                      delta.reshape(num_examples, -1, fan_out),
                      lambda kernel: kernel, module.use_bias)


def _as_tuple(value, spatial: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * spatial
  if isinstance(value, int):
    return (value,) * spatial
  return tuple(value)


def _patches(module: nn.Conv, window: tuple[int, ...], a: jax.Array
             ) -> jax.Array:
  """im2col by strided slicing: ``(N, *out, *window, C)`` patches.

  Slicing moves memory only; ``lax.conv_general_dilated_patches`` runs a
  convolution with a one-hot filter, which costs ``window * C`` times more
  multiply-adds than the layer itself on CPU.
  """
  spatial = len(window)
  strides = _as_tuple(module.strides, spatial)
  dilation = _as_tuple(module.kernel_dilation, spatial)
  if (module.feature_group_count != 1 or module.mask is not None
      or _as_tuple(module.input_dilation, spatial) != (1,) * spatial):
    raise ValueError(f'Conv {module.name}: grouped, masked or input-dilated '
                     'convolutions are not supported by one-pass clipping.')
  padding = module.padding
  if isinstance(padding, str) and padding.upper() in ('SAME', 'VALID'):
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = jax.lax.padtype_to_pads(a.shape[1:-1], dilated, strides,
                                      padding.upper())
  elif isinstance(padding, int):
    padding = [(padding, padding)] * spatial
  elif isinstance(padding, str):
    raise ValueError(f'Conv {module.name}: padding {padding!r} is not '
                     "supported by one-pass clipping (use 'SAME', 'VALID', "
                     'an int or explicit pairs).')
  padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  a = jnp.pad(a, [(0, 0)] + padding + [(0, 0)])
  out = [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s in
         zip(a.shape[1:-1], window, dilation, strides)]
  slices = []
  for offset in itertools.product(*(range(k) for k in window)):
    start = [0] + [o * d for o, d in zip(offset, dilation)] + [0]
    limit = [a.shape[0]] + [st + (n - 1) * s + 1 for st, n, s in
                            zip(start[1:-1], out, strides)] + [a.shape[-1]]
    slices.append(jax.lax.slice(a, start, limit, (1,) + strides + (1,)))
  patches = jnp.stack(slices, axis=-2)  # (N, *out, prod(window), C)
  return patches.reshape(patches.shape[:-2] + (-1,))


def _conv_grad(module: nn.Conv, a: jax.Array, delta: jax.Array
               ) -> _LayerGrad:
  """A conv is a dense layer on its im2col patches. ``a``: ``(B, ...,
  *spatial, C)`` for B examples, each with any number of images."""
  kernel_size = (module.kernel_size,) if isinstance(
      module.kernel_size, int) else tuple(module.kernel_size)
  spatial = len(kernel_size)
  num_examples = a.shape[0]
  # Each example scaled before im2col, not its patches after: the input is
  # up to prod(window) times smaller.
  a, a_exponent = _example_scaled(a.astype(jnp.float32))
  images = a.reshape((-1,) + a.shape[-(spatial + 1):])
  patches = _patches(module, kernel_size, images)
  # Patch features are ordered (*window, in_channel), like Flax kernels.
  kernel_shape = kernel_size + (a.shape[-1], delta.shape[-1])
  return _matrix_grad(
      patches.reshape(num_examples, -1, patches.shape[-1]),
      delta.reshape(num_examples, -1, delta.shape[-1]),
      lambda matrix: matrix.reshape(kernel_shape), module.use_bias,
      a_exponent)


def _tapped_loss(loss_fn, params, example, args, taps):
  """``loss_fn`` on one example, recording each layer's input and output and
  adding ``taps[path]`` (if given) to its output.

  Returns ``(loss_output, layer_inputs, layer_outputs)``, the last two keyed
  by the layer's scope path (``one_pass_probe.probe`` has refused layers
  called twice).
  """
  inputs, outputs_of = {}, {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name != '__call__'
        or type(module) not in _LAYER_TYPES):  # pylint: disable=unidiomatic-typecheck
      return next_fun(*call_args, **call_kwargs)
    path = module.scope.path
    inputs[path] = call_args[0]
    out = next_fun(*call_args, **call_kwargs)
    outputs_of[path] = out
    return out if taps is None else out + taps[path]

  with nn.intercept_methods(interceptor):
    out = loss_fn(params, example, *args)
  return out, inputs, outputs_of


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    l2_norm_clip: clip_plan.ClipSpec,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
  """One-pass drop-in for :func:`dplh_jax.dp.per_example.clipped_grad_sum`.

  Same arguments and result (up to float rounding; see the module docstring
  for the guarantee and what is not supported).

  Args:
    loss_fn: ``loss_fn(params, example, *args) -> loss`` or ``(loss, aux)``
      of ONE example; ``params`` is a Flax variables dict.
    l2_norm_clip: clip norm ``C`` of each example's whole gradient, a
      ``GroupClipNorms`` or ``ADAPTIVE`` (then pass ``clip_norm`` per call).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    microbatch_size: examples per chunk; None clips the whole batch at once.

  Returns:
    ``(params, batch, *args, is_padding_example=None, clip_norm=None) ->
    clipped_sum`` (or ``(clipped_sum, aux)``, ``aux`` per example).
  """
  l2_norm_clip = clip_plan.check_spec(l2_norm_clip)

  def loss_and_aux(params, example, *args):
    out = loss_fn(params, example, *args)
    return out if has_aux else (out, None)

  def clip_chunk(params, chunk, is_padding_example, *args, clip_norm=None):
    plan = clip_plan.plan(l2_norm_clip, params, clip_norm)
    num_examples = is_padding_example.shape[0]
    first = jax.tree.map(lambda x: x[0], chunk)
    modules, layer_keys = one_pass_probe.probe(loss_and_aux, params, first,
                                               args)
    layer_outputs = jax.eval_shape(lambda: _tapped_loss(
        loss_and_aux, params, first, args, None)[2])
    flat_params = traverse_util.flatten_dict(params)
    other_params = {key: value for key, value in flat_params.items()
                    if key not in layer_keys}

    def one_example(taps, others, example):
      merged = traverse_util.unflatten_dict(flat_params | others)
      (loss, aux), inputs, _ = _tapped_loss(loss_and_aux, merged, example,
                                            args, taps)
      return loss, (inputs, aux)

    zero_taps = {path: jnp.zeros(s.shape, s.dtype)
                 for path, s in layer_outputs.items()}
    # Each example in its own vmap lane: its deltas and inputs depend on it
    # alone, whatever the model does inside one example.
    (deltas, other_grads), (inputs, aux) = jax.vmap(
        jax.grad(one_example, argnums=(0, 1), has_aux=True),
        in_axes=(None, None, 0))(zero_taps, other_params, chunk)

    layer_grads = []
    for path, module in modules.items():
      grad_of = _dense_grad if type(module) is nn.Dense else _conv_grad  # pylint: disable=unidiomatic-typecheck
      layer_grads.append((path, grad_of(module, inputs[path], deltas[path])))
    # Each parameter's (n,) norms, keyed by its path, then combined per clip
    # group (each group's own scaled-norm combination: rule 9 per group).
    part_norms, other_exponents = {}, {}
    for key, g in other_grads.items():
      part_norms[key], (other_grads[key],), other_exponents[key] = (
          clip_norms.scaled_norms(
              [g.astype(jnp.float32).reshape(num_examples, -1)]))
    for path, layer in layer_grads:
      for name, norm in layer.part_norms.items():
        part_norms[('params',) + path + (name,)] = norm
    if set(part_norms) != set(flat_params):
      raise ValueError('No gradient for parameters '
                       f'{sorted(set(flat_params) - set(part_norms))} or '
                       f'gradients for unknown ones '
                       f'{sorted(set(part_norms) - set(flat_params))}.')
    group_parts = [[] for _ in range(plan.num_groups)]
    for key, norm in part_norms.items():
      group_parts[plan.group_of_path(key)].append(norm)
    group_norms = [clip_norms.combine_norms(parts) for parts in group_parts]
    # Any NaN/Inf that could reach the example's contribution makes a norm
    # non-finite (see _LayerGrad); it contributes 0 in every group.
    is_finite = jnp.ones((num_examples,), bool)
    for norms in group_norms:
      is_finite = is_finite & jnp.isfinite(norms.mantissa)
    factors = plan.factors(group_norms, is_finite, ~is_padding_example)

    sums = {key: factors.of_path(key).weighted_sum(
        g, other_exponents[key]).reshape(flat_params[key].shape)
            for key, g in other_grads.items()}
    for path, layer in layer_grads:
      keys = {name: ('params',) + path + (name,) for name in layer.part_norms}
      layer_sums = layer.clipped_sum(
          {name: factors.of_path(key) for name, key in keys.items()})
      for name, value in layer_sums.items():
        sums[keys[name]] = value
    for key, value in flat_params.items():
      if key not in sums or sums[key].shape != value.shape:
        raise ValueError(f'No gradient of the right shape for parameter '
                         f'{"/".join(key)} {value.shape}.')
    if set(sums) != set(flat_params):
      raise ValueError('Gradients for unknown parameters: '
                       f'{sorted(set(sums) - set(flat_params))}.')
    return dp_transform.clipped_sum_of(
        factors, traverse_util.unflatten_dict(sums)), aux

  return per_example.microbatched(clip_chunk, has_aux=has_aux,
                                  microbatch_size=microbatch_size)
