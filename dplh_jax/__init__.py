"""dplh-jax: differentially private multi-task face learning in JAX.

The DP-SGD core is importable on its own:

* :func:`dp_aggregate`, :func:`dpsgd` -- the optax clip-and-noise transform
  (``dplh_jax.dp_transform`` depends only on jax and optax);
* :func:`per_example_grads`, :func:`clipped_grad_sum` -- per-example
  gradients, optionally in microbatches;
* :class:`PoissonSampler` -- Poisson batch selection with padded shapes;
* :mod:`dplh_jax.accounting` -- epsilon, noise calibration and a serializable
  accountant on top of dp-accounting.
"""

from dplh_jax import accounting
from dplh_jax.accounting import PrivacyAccountant
from dplh_jax.batch_selection import PoissonSampler
from dplh_jax.batch_selection import SampledIndices
from dplh_jax.dp_transform import ClippedSum
from dplh_jax.dp_transform import clip_and_sum
from dplh_jax.dp_transform import dp_aggregate
from dplh_jax.dp_transform import DpAggregateState
from dplh_jax.dp_transform import dpsgd
from dplh_jax.per_example import clipped_grad_sum
from dplh_jax.per_example import per_example_grads

__all__ = [
    'accounting', 'ClippedSum', 'clip_and_sum', 'clipped_grad_sum',
    'dp_aggregate', 'DpAggregateState', 'dpsgd', 'per_example_grads',
    'PoissonSampler', 'PrivacyAccountant', 'SampledIndices',
]
