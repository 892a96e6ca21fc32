"""Per-example clipped gradient sums in one forward and one backward pass.

:func:`dplh_jax.per_example.clipped_grad_sum` differentiates each example on
its own under ``jax.vmap``. That is simple and obviously per example, but on
XLA:CPU vmap turns every convolution's weight gradient into a batch-grouped
convolution that runs several times slower than the plain one, and the
per-example gradients of large dense layers are materialized in full.

This module computes the same :class:`dp_transform.ClippedSum` the
"book-keeping" way (Bu, Wang, Zha and Karypis, "Differentially private
optimization on large model at small cost", ICML 2023), for Flax models whose
parameters all live in ``nn.Dense`` and ``nn.Conv`` layers, plus parameters
read only by the loss (HyperFace's learned log sigma^2):

1. One forward pass over every row of the chunk (an image's K crops are K
   rows) records each layer's input ``a`` and adds a zero "tap" to its output
   ``z`` (``flax.linen.intercept_methods``, nothing changes in the model).
2. One backward pass to the taps gives ``delta = dL/dz`` for every layer; no
   weight gradient is formed. Loss-only parameters get their per-example
   gradients in the same pass, through a per-example copy.
3. Example ``i``'s kernel gradient is ``sum_t a_t delta_t^T`` over its rows
   ``t`` (for a conv, every output position of every crop, with ``a_t`` its
   im2col patch). Its squared norm comes either from that materialized
   gradient or, when cheaper, from Gram matrices without forming it (the
   "ghost norm"): ``sum_{t,s} (a_t . a_s)(delta_t . delta_s)``.
4. ``dp_transform.clip_factors`` turns the total norms into clip scales, and
   the clipped sum is ``sum_i scale_i G_i`` (materialized) or
   ``sum_t a_t (scale delta)_t^T`` (ghost).

Guarantee: the same as ``dp_transform.clip_and_sum``. Example ``i``
contributes ``scale_i`` times the gradient whose norm gave ``scale_i``, both
computed in float32 at HIGHEST matmul precision from the same ``a`` and
``delta``, so the sum's L2 sensitivity to adding or removing one example is
``C``. Padding and non-finite examples are selected away before any product.

Precondition (not checked here; tested for HyperFace against the vmap path in
tests/one_pass_clipping_test.py): ``apply_fn`` keeps each example's rows
contiguous and in order in every layer (``(B, R, ...)`` flattened to
``(B*R, ...)``) and no row depends on another example's rows: no BatchNorm, no
attention across the batch. vmap guarantees that by construction; here the
model must.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from dplh_jax import dp_transform
from dplh_jax import per_example

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _LayerGrad:
  """Per-example statistics of one layer's gradient.

  Attributes:
    sq_norm: ``(B,)`` squared norm of each example's kernel + bias gradient.
    is_finite: ``(B,)`` whether the example's inputs and output gradients at
      this layer are finite.
    clipped_sum: ``factors -> {'kernel': ..., 'bias': ...}`` weighted sums.
  """
  sq_norm: jax.Array
  is_finite: jax.Array
  clipped_sum: Callable[[dp_transform.ClipFactors], dict[str, jax.Array]]


def _rows_per_example(x: jax.Array, num_examples: int, width: int
                      ) -> jax.Array:
  """``(B*R, ..., width)`` -> ``(B, T, width)`` float32, T rows of each."""
  if x.shape[0] % num_examples:
    raise ValueError(f'A layer sees {x.shape[0]} rows, not a multiple of the '
                     f'{num_examples} examples: rows must be example-major.')
  return x.astype(jnp.float32).reshape(num_examples, -1, width)


def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _matrix_grad(a: jax.Array, delta: jax.Array, to_kernel: Callable,
                 use_bias: bool) -> _LayerGrad:
  """Per-example gradient of ``z_t = a_t @ W (+ b)`` from ``(B, T, n)`` inputs
  and ``(B, T, o)`` output gradients; ``to_kernel`` maps ``(n, o)`` to the
  kernel's layout."""
  rows, fan_in = a.shape[1:]
  fan_out = delta.shape[2]
  is_finite = _all_finite(a) & _all_finite(delta)
  bias_grads = jnp.sum(delta, axis=1)
  sq_norm = jnp.sum(jnp.square(bias_grads), axis=1) if use_bias else 0.0

  if rows * (fan_in + fan_out) < fan_in * fan_out:
    # Ghost norm: T x T Gram matrices instead of n x o gradients.
    gram_a = jnp.einsum('btn,bsn->bts', a, a, precision=_HIGHEST)
    gram_delta = jnp.einsum('bto,bso->bts', delta, delta, precision=_HIGHEST)
    sq_norm = sq_norm + jnp.sum(gram_a * gram_delta, axis=(1, 2))

    def kernel_sum(factors: dp_transform.ClipFactors) -> jax.Array:
      keep = factors.keep[:, None, None]
      scaled = factors.scale[:, None, None] * jnp.where(keep, delta, 0.0)
      return jnp.einsum('btn,bto->no', jnp.where(keep, a, 0.0), scaled,
                        precision=_HIGHEST)
  else:
    grads = jnp.einsum('btn,bto->bno', a, delta, precision=_HIGHEST)
    sq_norm = sq_norm + jnp.sum(jnp.square(grads), axis=(1, 2))

    def kernel_sum(factors: dp_transform.ClipFactors) -> jax.Array:
      return factors.weighted_sum(grads)

  def clipped_sum(factors):
    sums = {'kernel': to_kernel(kernel_sum(factors))}
    if use_bias:
      sums['bias'] = factors.weighted_sum(bias_grads)
    return sums

  return _LayerGrad(sq_norm, is_finite, clipped_sum)


def _dense_grad(module: nn.Dense, a: jax.Array, delta: jax.Array,
                num_examples: int) -> _LayerGrad:
  fan_in, fan_out = a.shape[-1], delta.shape[-1]
  return _matrix_grad(_rows_per_example(a, num_examples, fan_in),
                      _rows_per_example(delta, num_examples, fan_out),
                      lambda kernel: kernel, module.use_bias)


def _as_tuple(value, spatial: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * spatial
  if isinstance(value, int):
    return (value,) * spatial
  return tuple(value)


def _patches(module: nn.Conv, a: jax.Array) -> jax.Array:
  """im2col by strided slicing: ``(N, *out, *window, C)`` patches.

  Slicing moves memory only; ``lax.conv_general_dilated_patches`` runs a
  convolution with a one-hot filter, which costs ``window * C`` times more
  multiply-adds than the layer itself on CPU.
  """
  window = tuple(module.kernel_size)
  spatial = len(window)
  strides = _as_tuple(module.strides, spatial)
  dilation = _as_tuple(module.kernel_dilation, spatial)
  if (module.feature_group_count != 1 or module.mask is not None
      or _as_tuple(module.input_dilation, spatial) != (1,) * spatial):
    raise ValueError(f'Conv {module.name}: grouped, masked or input-dilated '
                     'convolutions are not supported by one-pass clipping.')
  if a.ndim != spatial + 2:
    raise ValueError(f'Conv {module.name}: expected inputs (rows, spatial..., '
                     f'channels), got shape {a.shape}.')
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


def _conv_grad(module: nn.Conv, a: jax.Array, delta: jax.Array,
               num_examples: int) -> _LayerGrad:
  """A conv is a dense layer on its im2col patches."""
  patches = _patches(module, a)
  # Patch features are ordered (*window, in_channel), like Flax kernels.
  kernel_shape = tuple(module.kernel_size) + (a.shape[-1], delta.shape[-1])
  return _matrix_grad(
      _rows_per_example(patches, num_examples, patches.shape[-1]),
      _rows_per_example(delta, num_examples, delta.shape[-1]),
      lambda matrix: matrix.reshape(kernel_shape), module.use_bias)


_LAYER_GRADS = ((nn.Dense, _dense_grad), (nn.Conv, _conv_grad))


def _tapped_apply(apply_fn, params, chunk, args, taps, modules):
  """Runs ``apply_fn``, recording each layer's input and output and adding
  ``taps[path]`` (if given) to its output.

  Returns ``(outputs, layer_inputs, layer_outputs)``, the last two keyed by
  the layer's scope path; ``modules`` collects the layers by the same key.
  """
  inputs, outputs_of = {}, {}

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(
        module, tuple(kind for kind, _ in _LAYER_GRADS)):
      return next_fun(*call_args, **call_kwargs)
    path = module.scope.path
    if path in inputs:
      raise ValueError(f'Layer {"/".join(path)} is called more than once; '
                       'shared layers are not supported by one-pass clipping.')
    inputs[path] = call_args[0]
    modules[path] = module
    out = next_fun(*call_args, **call_kwargs)
    outputs_of[path] = out
    return out if taps is None else out + taps[path]

  with nn.intercept_methods(interceptor):
    outputs = apply_fn(params, chunk, *args)
  return outputs, inputs, outputs_of


def _check_loss_params_unused(apply_fn, params, chunk, args, loss_keys):
  """Refuses parameters outside Dense/Conv layers that the forward reads
  (GroupNorm scales, embeddings...): their per-example gradient would be
  missing from the norm, so the clipped sum would be wrong."""
  flat = traverse_util.flatten_dict(params)
  keys = sorted(loss_keys)

  def forward(loss_leaves):
    return apply_fn(traverse_util.unflatten_dict(
        flat | dict(zip(keys, loss_leaves))), chunk, *args)

  jaxpr = jax.make_jaxpr(forward)([flat[k] for k in keys]).jaxpr
  used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  used |= {id(v) for v in jaxpr.outvars}
  for key, var in zip(keys, jaxpr.invars):
    if id(var) in used:
      raise ValueError(
          f'Parameter {"/".join(key)} is read by the forward pass but is not '
          'in an nn.Dense or nn.Conv layer, so one-pass clipping cannot give '
          'its per-example gradient; use per_example.clipped_grad_sum.')


def clipped_grad_sum(
    apply_fn: Callable[..., PyTree],
    example_loss: Callable[..., Any],
    l2_norm_clip: float,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
  """One-pass drop-in for :func:`dplh_jax.per_example.clipped_grad_sum`.

  Args:
    apply_fn: ``apply_fn(params, chunk, *args) -> outputs``: the model on a
      chunk of examples (a pytree with leading axis B), returning outputs
      with leading axis B. Inside, each example's rows must stay contiguous
      and apart from other examples' (see the module docstring).
    example_loss: ``example_loss(params, outputs, example) -> loss`` (or
      ``(loss, aux)``) of ONE example from its own outputs. It may read
      parameters that the model does not (e.g. learned task weights); their
      per-example gradients are included in the norm.
    l2_norm_clip: clip norm ``C`` of each example's whole gradient.
    has_aux: whether ``example_loss`` returns ``(loss, aux)``.
    microbatch_size: examples per chunk; None clips the whole batch at once.

  Returns:
    ``(params, batch, *args, is_padding_example=None) -> clipped_sum`` (or
    ``(clipped_sum, aux)``), equal to the vmap path's up to float rounding.
  """
  l2_norm_clip = dp_transform.check_l2_norm_clip(l2_norm_clip)

  def clip_chunk(params, chunk, is_padding_example, *args):
    num_examples = is_padding_example.shape[0]
    modules = {}
    layer_outputs = jax.eval_shape(lambda: _tapped_apply(
        apply_fn, params, chunk, args, None, modules)[2])
    flat_params = traverse_util.flatten_dict(params)
    # ('params', *layer path, 'kernel' | 'bias') belongs to a layer.
    loss_params = {key: value for key, value in flat_params.items()
                   if key[1:-1] not in modules}
    _check_loss_params_unused(apply_fn, params, chunk, args, loss_params)

    def total_loss(taps, per_example_loss_params):
      outputs, inputs, _ = _tapped_apply(apply_fn, params, chunk, args, taps,
                                         {})

      def one_example(own_params, example_outputs, example):
        merged = traverse_util.unflatten_dict(flat_params | own_params)
        out = example_loss(merged, example_outputs, example)
        return out if has_aux else (out, None)

      losses, aux = jax.vmap(one_example)(per_example_loss_params, outputs,
                                          chunk)
      # Rows never mix across examples, so d(sum)/dz of an example's rows is
      # the derivative of that example's own loss.
      return jnp.sum(losses), (inputs, aux)

    zero_taps = {path: jnp.zeros(s.shape, s.dtype)
                 for path, s in layer_outputs.items()}
    copies = {key: jnp.broadcast_to(value, (num_examples,) + value.shape)
              for key, value in loss_params.items()}
    (deltas, loss_grads), (inputs, aux) = jax.grad(
        total_loss, argnums=(0, 1), has_aux=True)(zero_taps, copies)

    layer_grads = []
    for path, module in modules.items():
      grad_of = next(fn for kind, fn in _LAYER_GRADS
                     if isinstance(module, kind))
      layer_grads.append((path, grad_of(module, inputs[path], deltas[path],
                                        num_examples)))
    loss_grads = {key: g.astype(jnp.float32).reshape(num_examples, -1)
                  for key, g in loss_grads.items()}
    sq_norms = jnp.zeros((num_examples,), jnp.float32)
    is_finite = jnp.ones((num_examples,), bool)
    for _, layer in layer_grads:
      sq_norms += layer.sq_norm
      is_finite &= layer.is_finite
    for g in loss_grads.values():
      sq_norms += jnp.sum(jnp.square(g), axis=1)
      is_finite &= _all_finite(g)
    factors = dp_transform.clip_factors(
        sq_norms, is_finite & jnp.isfinite(sq_norms), ~is_padding_example,
        l2_norm_clip)

    sums = {key: factors.weighted_sum(g).reshape(flat_params[key].shape)
            for key, g in loss_grads.items()}
    for path, layer in layer_grads:
      for name, value in layer.clipped_sum(factors).items():
        sums[('params',) + path + (name,)] = value
    if set(sums) != set(flat_params):
      raise ValueError('Gradient and parameter trees differ at '
                       f'{sorted(set(flat_params) ^ set(sums))}.')
    return factors.clipped_sum(traverse_util.unflatten_dict(sums)), aux

  return per_example.microbatched(clip_chunk, has_aux=has_aux,
                                  microbatch_size=microbatch_size)
