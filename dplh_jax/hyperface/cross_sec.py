"""Cross-SEC: one squeeze-excitation channel gate per task over shared maps.

MetaMorphosis (Arefeen et al., 2023) gives each task its own channel
attention over the shared features, so that each head receives features fit
for its task only. Its formulas are not available to us; this module is our
definition from the abstract (docs/DESIGN.md, Task privacy):

For one crop's shared feature map ``M`` of shape ``(H, W, C)``:

1. squeeze: ``z = mean_{h,w} M[h, w, :]`` (over this crop's own positions);
2. excitation of task ``t``: ``e_t = W2_t relu(W1_t z + b1_t) + b2_t``, a
   bottleneck of ``max(1, C // reduction)`` units;
3. optional cross-task term: with the tasks' own descriptors
   ``o_u = sigmoid(e_u) * z``, task ``t``'s logits become
   ``e_t + X_t mean_{u != t} o_u`` (a Dense ``C -> C``), so a task's gate
   sees which channels the other tasks take and can drop them;
4. gate ``g_t = sigmoid(e_t [+ cross term])`` in (0, 1)^C; task ``t``'s map
   is ``g_t * M`` (the gate is constant over positions) and its channel
   descriptor ``d_t = g_t * z``, the squeeze of its gated map.

Per example by construction: every quantity is a function of one crop's map
(no statistics over crops, images or the batch, no BatchNorm), so the module
can sit under ``jax.vmap(jax.grad(...))`` and inside one-pass clipping. Every
weight is in the 'params' tree, inside each image's clipped gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Bottleneck ratio of each task's excitation (Hu et al. use 16 for 64+
# channels; the CPU-sized maps here have 24 to 192 channels).
REDUCTION = 4


class CrossSEC(nn.Module):
  """Task-wise channel gates ``(..., H, W, C) -> (..., T, H, W, C)``.

  Attributes:
    task_names: one gate per name, in this order (the ``T`` axis).
    cross_task: adds the cross-task term (step 3 of the module docstring).
    reduction: bottleneck ratio.
  """

  task_names: Sequence[str]
  cross_task: bool = True
  reduction: int = REDUCTION

  @nn.compact
  def __call__(self, feature_map: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Gates ``feature_map`` once per task.

    Args:
      feature_map: ``(..., H, W, C)``, one map per leading index (crop).

    Returns:
      ``(gated, descriptors)``: ``(..., T, H, W, C)`` gated maps and
      ``(..., T, C)`` channel descriptors ``d_t = g_t * z``.
    """
    channels = feature_map.shape[-1]
    squeezed = jnp.mean(feature_map, axis=(-3, -2))
    hidden = max(1, channels // self.reduction)
    logits = []
    for task in self.task_names:
      bottleneck = nn.relu(nn.Dense(hidden, name=f'{task}_squeeze')(squeezed))
      logits.append(nn.Dense(channels, name=f'{task}_excite')(bottleneck))
    if self.cross_task and len(self.task_names) > 1:
      own = [jax.nn.sigmoid(e) * squeezed for e in logits]
      others = len(own) - 1
      logits = [
          e + nn.Dense(channels, name=f'{task}_cross')(
              sum(own[:t] + own[t + 1:]) / others)
          for t, (task, e) in enumerate(zip(self.task_names, logits))]
    gates = jnp.stack([jax.nn.sigmoid(e) for e in logits], axis=-2)
    gated = gates[..., None, None, :] * feature_map[..., None, :, :, :]
    return gated, gates * squeezed[..., None, :]
