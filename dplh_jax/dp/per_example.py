"""Per-example gradients, optionally in microbatches, and their fused clipped sum.

One example is the privacy unit (in dplh-jax one image with all its
proposals), so the loss function given here must compute the loss of a single
example: ``loss_fn(params, example, *args)`` where ``example`` is one slice of
the batch along its leading axis. Arguments after the batch are shared by all
examples; per-example randomness (dropout) belongs inside the batch.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dplh_jax.dp import clip_plan
from dplh_jax.dp import dp_transform

PyTree = Any


def _batch_size(batch: PyTree) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(
        f'All leaves of the batch need one leading example axis; got sizes '
        f'{sorted(sizes)}.')
  return sizes.pop()


def _check_microbatch_size(microbatch_size: int | None) -> None:
  if microbatch_size is not None and (
      not isinstance(microbatch_size, int) or microbatch_size < 1):
    raise ValueError(
        f'microbatch_size must be a positive int or None, got '
        f'{microbatch_size!r}.')


def per_example_grads(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
  """Transforms a single-example loss into a batch of per-example gradients.

  ``per_example_grads(loss_fn)(params, batch, *args)`` returns gradients with
  respect to ``params`` with a leading example axis on every leaf, equal to
  ``[jax.grad(loss_fn)(params, example_i, *args) for example_i in batch]``.
  With ``has_aux`` it returns ``(grads, aux)``, ``aux`` per example too.

  With ``microbatch_size``, the examples are processed ``microbatch_size`` at
  a time in a ``lax.map`` loop, so activations and intermediate values are held
  for one microbatch only; the result is the same. (The returned gradients
  still span the whole batch: use :func:`clipped_grad_sum` to avoid holding
  them.) The batch size need not be a multiple of ``microbatch_size``.

  Args:
    loss_fn: ``loss_fn(params, example, *args) -> loss`` or ``(loss, aux)``.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    microbatch_size: Examples per chunk, or None for one vmap over the batch.

  Returns:
    A function ``(params, batch, *args) -> grads`` (or ``(grads, aux)``).
  """
  _check_microbatch_size(microbatch_size)
  grad_fn = jax.grad(loss_fn, has_aux=has_aux)

  def batched(params, batch, *args):
    def one_example(example):
      return grad_fn(params, example, *args)

    if microbatch_size is None:
      return jax.vmap(one_example)(batch)
    return jax.lax.map(one_example, batch, batch_size=microbatch_size)

  return batched


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    l2_norm_clip: clip_plan.ClipSpec,
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
  """Per-example gradients clipped and summed inside the microbatch loop.

  ``clipped_grad_sum(loss_fn, C, microbatch_size=m)(params, batch, *args,
  is_padding_example=mask)`` returns a :class:`dp_transform.ClippedSum` equal
  to ``dp_transform.clip_and_sum(per_example_grads(loss_fn)(params, batch,
  *args), C, mask)``, but only ``m`` per-example gradients exist at a time, so
  memory does not grow with the batch. Pass the result to
  :func:`dp_transform.dp_aggregate`'s update to add noise; the guarantee is
  the same (sensitivity ``C`` of the sum to one example).

  With ``has_aux`` it returns ``(clipped_sum, aux)`` with ``aux`` per example.

  ``l2_norm_clip`` may also be a ``group_clipping.GroupClipNorms`` (each
  group of parameters clipped to its own norm; sensitivity
  ``sqrt(sum_g C_g**2)``) or ``clip_plan.ADAPTIVE``, also exported as
  ``adaptive_clipping.ADAPTIVE``: then call with
  ``clip_norm=adaptive_clipping.current_clip_norm(opt_state)`` and feed the
  result to ``adaptive_clipping.dp_aggregate_adaptive``.

  Args:
    loss_fn: ``loss_fn(params, example, *args) -> loss`` or ``(loss, aux)``.
    l2_norm_clip: Clipping norm ``C`` of each example's whole gradient, a
      ``GroupClipNorms`` or ``ADAPTIVE``.
    has_aux: Whether ``loss_fn`` returns ``(loss, aux)``.
    microbatch_size: Examples per chunk; None clips the whole batch at once.

  Returns:
    A function ``(params, batch, *args, is_padding_example=None,
    clip_norm=None)``.
  """
  l2_norm_clip = clip_plan.check_spec(l2_norm_clip)
  grads_of = per_example_grads(loss_fn, has_aux=has_aux)

  def clip_chunk(params, chunk, padding, *args, clip_norm=None):
    out = grads_of(params, chunk, *args)
    grads, aux = out if has_aux else (out, None)
    return dp_transform.clip_and_sum(grads, l2_norm_clip, padding,
                                     clip_norm=clip_norm), aux

  return microbatched(clip_chunk, has_aux=has_aux,
                      microbatch_size=microbatch_size)


def microbatched(
    clip_chunk: Callable[..., tuple[dp_transform.ClippedSum, Any]],
    *,
    has_aux: bool = False,
    microbatch_size: int | None = None,
) -> Callable[..., Any]:
  """Sums a chunk clipper's :class:`dp_transform.ClippedSum` over microbatches.

  ``clip_chunk(params, chunk, is_padding_example, *args, clip_norm=None) ->
  (clipped_sum, aux)`` clips and sums the examples of one chunk (``aux`` per
  example, or None); ``clip_norm`` is the adaptive ``C``, passed through to
  every chunk. The sum over chunks has the chunk sums' guarantee: each example
  is in exactly one chunk, so the total's sensitivity to one example is that
  of one chunk's sum.

  Speed on CPU: with more than one chunk, the chunks run in a ``lax.scan``
  that skips all-padding chunks with ``lax.cond``; memory then stays flat in
  the batch size, but XLA:CPU runs loop bodies 2-3x slower than top-level
  code. With ``microbatch_size`` None (or >= the batch) there is no loop.

  Args:
    clip_chunk: the per-chunk clipper.
    has_aux: whether to return the per-example ``aux`` too.
    microbatch_size: examples per chunk; None clips the whole batch at once.

  Returns:
    ``(params, batch, *args, is_padding_example=None, clip_norm=None) ->
    clipped_sum`` or ``(clipped_sum, aux)``.
  """
  _check_microbatch_size(microbatch_size)

  def fused(params, batch, *args, is_padding_example=None, clip_norm=None):
    n = _batch_size(batch)
    if n == 0:
      raise ValueError('The batch is empty; pad it to at least one example '
                       '(a Poisson step with no example still adds noise).')
    if is_padding_example is None:
      is_padding_example = jnp.zeros((n,), dtype=bool)
    if is_padding_example.shape != (n,):
      raise ValueError(f'is_padding_example has shape '
                       f'{is_padding_example.shape}, expected ({n},).')
    if is_padding_example.dtype != jnp.bool_:
      # One-pass clipping negates the mask with ~: on 0/1 ints that is -1/-2.
      raise ValueError(f'is_padding_example has dtype '
                       f'{is_padding_example.dtype}, expected bool (True for '
                       'padding): pass mask.astype(bool).')
    m = n if microbatch_size is None else min(microbatch_size, n)
    if m == n:
      # No loop and no padding skip: XLA:CPU runs the body of a scan or a
      # cond 2-3x slower than the same ops at top level (measured in
      # experiments/bench_dp_step.py), so one chunk is computed directly.
      out = clip_chunk(params, batch, is_padding_example, *args,
                       clip_norm=clip_norm)
      return out if has_aux else out[0]
    num_chunks, remainder = divmod(n, m)
    split = num_chunks * m

    def chunked(x, start, stop, chunks):
      return x[start:stop].reshape((chunks, m) + x.shape[1:])

    first = jax.tree.map(lambda x: x[:m], batch)
    zero_clipped, zero_aux = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda: clip_chunk(params, first, is_padding_example[:m], *args,
                               clip_norm=clip_norm)))
    skipped = zero_clipped
    if skipped.clip_norm_tag is not None:
      # A skipped chunk's m slots count as clipped to clip_norm (they add
      # zero, like padding); the chunks that ran carry their own tags, so a
      # chunk clipper that ignores clip_norm still shows in the total.
      skipped = dataclasses.replace(
          skipped, clip_norm_tag=clip_plan.clip_norm_tag(clip_norm, m))

    def body(total, chunk_and_padding):
      chunk, padding = chunk_and_padding
      # A chunk of padding only contributes zero: skip its forward and
      # backward pass. The sampler puts padding last, so with a generous
      # padded size the extra chunks cost (almost) nothing. (Step time then
      # varies with the realized batch size; DP-SGD's guarantee covers the
      # released updates, not timings.)
      clipped, aux = jax.lax.cond(
          jnp.all(padding), lambda: (skipped, zero_aux),
          lambda: clip_chunk(params, chunk, padding, *args,
                             clip_norm=clip_norm))
      return jax.tree.map(jnp.add, total, clipped), aux

    total, aux = jax.lax.scan(
        body, zero_clipped,
        (jax.tree.map(lambda x: chunked(x, 0, split, num_chunks), batch),
         chunked(is_padding_example, 0, split, num_chunks)))
    if has_aux:
      aux = jax.tree.map(lambda a: a.reshape((split,) + a.shape[2:]), aux)
    if remainder:
      rest = jax.tree.map(lambda x: x[split:], batch)
      clipped, rest_aux = clip_chunk(
          params, rest, is_padding_example[split:], *args,
          clip_norm=clip_norm)
      total = jax.tree.map(jnp.add, total, clipped)
      if has_aux:
        aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), aux, rest_aux)
    return (total, aux) if has_aux else total

  return fused
