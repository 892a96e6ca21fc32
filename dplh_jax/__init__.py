"""dplh-jax: differentially private multi-task face learning in JAX.

Two layers (docs/DESIGN.md, Layout):

* :mod:`dplh_jax.dp` -- the DP-SGD core, which needs only jax, optax, numpy,
  scipy and dp-accounting (``pip install dplh-jax``): the optax clip-and-noise
  transform, per-example and one-pass clipped gradient sums, Poisson batch
  selection, accounting, budget planning, the privacy report and auditing.
  Its main names are re-exported here.
* :mod:`dplh_jax.hyperface` -- the HyperFace face application built on it
  (``pip install 'dplh-jax[faces]'``): model, losses, data, training, the
  ``dplh-train`` command. Importing ``dplh_jax`` never imports it.
"""

from dplh_jax.dp import accounting
from dplh_jax.dp.accounting import PrivacyAccountant
from dplh_jax.dp.batch_iterator import PaddedBatches
from dplh_jax.dp.batch_iterator import SampledBatch
from dplh_jax.dp.batch_selection import gather_padded
from dplh_jax.dp.batch_selection import PoissonSampler
from dplh_jax.dp.batch_selection import SampledIndices
from dplh_jax.dp.dp_transform import clip_and_sum
from dplh_jax.dp.dp_transform import ClippedSum
from dplh_jax.dp.dp_transform import dp_aggregate
from dplh_jax.dp.dp_transform import dp_state
from dplh_jax.dp.dp_transform import DpAggregateState
from dplh_jax.dp.dp_transform import dpsgd
from dplh_jax.dp.per_example import clipped_grad_sum
from dplh_jax.dp.per_example import per_example_grads
from dplh_jax.dp.private_setup import make_private
from dplh_jax.dp.private_setup import PrivateSetup

__all__ = [
    'accounting', 'ClippedSum', 'clip_and_sum', 'clipped_grad_sum',
    'dp_aggregate', 'dp_state', 'DpAggregateState', 'dpsgd', 'gather_padded',
    'make_private', 'PaddedBatches', 'per_example_grads', 'PoissonSampler',
    'PrivacyAccountant', 'PrivateSetup', 'SampledBatch', 'SampledIndices',
]
