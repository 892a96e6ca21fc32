"""What one-pass clipping can differentiate exactly, checked before it runs.

``one_pass_clipping`` rebuilds each ``nn.Dense`` / ``nn.Conv`` kernel
gradient as ``sum_t a_t delta_t^T`` from the layer's input and output
gradient. That is the true gradient only if the loss reads each of the
layer's parameters exactly once, by that layer's own contraction, reaching it
at most through a float cast or a non-permuting reshape. :func:`probe`
traces the loss once and refuses, naming the parameter or layer, every model
where that does not hold; the user then clips with
``per_example.clipped_grad_sum`` (``clipping='vmap'``).

Known gap (docs/DESIGN.md, Privacy rules, rule 9): a loss that reads a
parameter once but feeds the layer another tensor is not detected. Privacy
holds either way, since the norm is measured on what is added.
"""

from __future__ import annotations

import collections

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

# Exactly these types: a subclass may compute something else in __call__, so
# it is left to ordinary autodiff like any other layer.
LAYER_TYPES = (nn.Dense, nn.Conv)


# Primitives that only re-type or re-shape a parameter on its way to its
# layer's contraction (a dtype cast, the bias's broadcastable reshape).
_PASS_THROUGH = frozenset({'convert_element_type', 'reshape',
                           'broadcast_in_dim', 'expand_dims', 'squeeze',
                           'copy'})
# What must finally read each parameter for its gradient to be the one
# rebuilt from the layer's input and output gradient.
_CONSUMERS = {'kernel': frozenset({'dot_general', 'conv_general_dilated'}),
              'bias': frozenset({'add'})}


def _passes_through(eqn) -> bool:
  """Whether ``eqn`` only re-types or re-shapes its input: a float-to-float
  cast, a reshape that does not permute (``dimensions``), a broadcast."""
  name = eqn.primitive.name
  if name not in _PASS_THROUGH:
    return False
  if name == 'reshape' and eqn.params.get('dimensions') is not None:
    return False
  if name == 'convert_element_type':
    return all(jnp.issubdtype(v.aval.dtype, jnp.floating)
               for v in (*eqn.invars, *eqn.outvars))
  return True


def _record_uses(jaxpr, tracked: dict, uses: dict) -> dict:
  """Appends to ``uses[key]`` the primitive of each equation reading a
  tracked variable, following it through pass-through primitives and into
  (and out of) nested jaxprs of call-like primitives (jit, remat). A custom
  derivative (``custom_jvp_call``, ``custom_vjp_call``) is recorded as a use
  itself: its gradient rule is user code.

  Returns ``tracked`` with the variables the tracked values flowed into.
  """
  tracked = dict(tracked)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    inner = eqn.params.get('jaxpr') or eqn.params.get('call_jaxpr')
    inner = getattr(inner, 'jaxpr', inner)
    for position, var in enumerate(eqn.invars):
      if id(var) not in tracked:
        continue
      key = tracked[id(var)]
      if ('custom' not in name and inner is not None
          and len(inner.invars) == len(eqn.invars)
          and len(inner.outvars) == len(eqn.outvars)):
        flowed = _record_uses(inner, {id(inner.invars[position]): key}, uses)
        for inner_out, outer_out in zip(inner.outvars, eqn.outvars):
          if id(inner_out) in flowed:
            tracked[id(outer_out)] = key
      elif _passes_through(eqn):
        for out in eqn.outvars:
          tracked[id(out)] = key
      else:
        uses[key].append(name)
  return tracked


# Attributes that replace the layer's contraction with user code: the kernel
# gradient would no longer be sum_t a_t delta_t^T.
_CUSTOM_CONTRACTIONS = {
    nn.Dense: ('dot_general', 'dot_general_cls'),
    nn.Conv: ('conv_general_dilated', 'conv_general_dilated_cls'),
}


def probe(loss_fn, params, example, args) -> tuple[dict, dict]:
  """The layers one-pass clipping handles, and how the loss reads each
  parameter; raises ValueError naming what it cannot handle exactly.

  Refused: a layer's kernel or bias read more than once (tied weights, a
  weight penalty: the other part of its gradient would be missing), read
  through a custom derivative (its rule, not ``a^T delta``, defines the
  gradient), transformed on its way to the layer by anything but a cast or
  a reshape (``lax.stop_gradient``, a scaling: the gradient would be that of
  the transformed value), or a Dense / Conv with a custom contraction.

  Returns:
    ``(modules, layer_keys)``: the layers by scope path, and the flat keys of
    their parameters.
  """
  modules = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (context.method_name == '__call__'
        and type(module) in LAYER_TYPES):  # pylint: disable=unidiomatic-typecheck
      path = module.scope.path
      if path in modules:
        raise ValueError(f'Layer {"/".join(path)} is called more than once; '
                         'shared layers are not supported by one-pass '
                         'clipping.')
      modules[path] = module
    return next_fun(*call_args, **call_kwargs)

  flat = traverse_util.flatten_dict(params)
  keys = sorted(flat)

  def loss_of(leaves):
    with nn.intercept_methods(record):
      return loss_fn(traverse_util.unflatten_dict(dict(zip(keys, leaves))),
                     example, *args)

  jaxpr = jax.make_jaxpr(loss_of)([flat[k] for k in keys]).jaxpr
  uses = collections.defaultdict(list)
  _record_uses(jaxpr, {id(v): k for v, k in zip(jaxpr.invars, keys)}, uses)
  for path, module in modules.items():
    for attribute in _CUSTOM_CONTRACTIONS[type(module)]:
      if getattr(module, attribute, None) is not None:
        raise ValueError(
            f'Layer {"/".join(path)} ({type(module).__name__}) has a custom '
            f'{attribute}; one-pass clipping cannot derive its kernel '
            "gradient. Use per_example.clipped_grad_sum (clipping='vmap').")
  # ('params', *layer path, 'kernel' | 'bias') belongs to a layer.
  layer_keys = {key for key in flat if key[1:-1] in modules}
  for key in sorted(layer_keys):
    name = '/'.join(key)
    custom = [use for use in uses[key] if 'custom' in use]
    if custom:
      raise ValueError(
          f'Parameter {name} is read through a custom derivative '
          f'({custom[0]}); one-pass clipping cannot see its gradient rule. '
          "Use per_example.clipped_grad_sum (clipping='vmap').")
    if len(uses[key]) > 1:
      raise ValueError(
          f'Parameter {name} is read {len(uses[key])} times, not only by '
          'its layer; one-pass clipping would miss part of its gradient. Use '
          "per_example.clipped_grad_sum (clipping='vmap').")
    if not uses[key]:
      raise ValueError(
          f'Parameter {name} is not read by the loss through its params '
          '(closed-over params?); one-pass clipping could not see its '
          "gradient. Use per_example.clipped_grad_sum (clipping='vmap').")
    if uses[key][0] not in _CONSUMERS.get(key[-1], ()):
      raise ValueError(
          f'Parameter {name} reaches its layer through {uses[key][0]}, not '
          'directly; one-pass clipping would differentiate the transformed '
          "value. Use per_example.clipped_grad_sum (clipping='vmap').")
  return modules, layer_keys
