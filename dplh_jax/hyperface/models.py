"""HyperFace (Ranjan et al., TPAMI 2017) and its single-task detection twin, in Flax Linen.

The network follows docs/DESIGN.md, Model: an AlexNet trunk whose conv1 (after
max1), conv3 and pool5 features are fused (conv1a / conv3a / pool5 ->
concat -> conv_all 1x1 -> fc_full) and five task heads on top.

Everything here is per example by construction: one image's K proposal crops are
a ``(K, H, W, 3)`` batch, and no layer mixes the rows of that batch (no
BatchNorm; the optional GroupNorm normalizes each crop on its own). So the model
can sit under ``jax.vmap(jax.grad(...))``, where vmap adds the outer image axis
and each image keeps its own gradient (docs/DESIGN.md, Privacy rules, rule 4).

Small inputs. With the paper's conv1 (kernel 11, stride 4) a 64x64 crop
collapses to nothing before pool5, so the config also exposes conv1's kernel
and stride. conv1a and conv3a then get non-overlapping ("kernel = stride")
pooling-like kernels computed from the actual feature sizes so that their
outputs match pool5's spatial size; see :func:`trunk_geometry`. For 227x227 this
rule gives back the paper's kernel 4 / stride 4 and kernel 2 / stride 2.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dplh_jax.hyperface import cross_sec

# The five HyperFace tasks, in the order used for every per-task vector (for
# example the learned log sigma^2 parameter).
TASK_NAMES = ('detection', 'landmarks', 'visibility', 'pose', 'gender')
NUM_LANDMARKS = 21
TASK_OUTPUT_SIZES = {
    'detection': 2,  # face / background logits
    'landmarks': 2 * NUM_LANDMARKS,  # (x0, y0, x1, y1, ...) in crop coordinates
    'visibility': NUM_LANDMARKS,  # regressed visibility, one per landmark
    'pose': 3,  # roll, pitch, yaw in radians
    'gender': 2,  # female / male logits
}
# Name of HyperFace's learned per-task log sigma^2 vector in the 'params' tree.
LOG_SIGMA_SQ = 'log_sigma_sq'
# Name of the shared trunk submodule.
TRUNK = 'trunk'
# What the heads read (HyperFaceConfig.task_features): the one shared fc_full
# vector, or each task its own Cross-SEC-gated features (cross_sec.py).
SHARED, CROSS_SEC = 'shared', 'cross_sec'
TASK_FEATURE_KINDS = (SHARED, CROSS_SEC)
# Name of the Cross-SEC submodule inside the trunk.
CROSS_SEC_GATES = 'cross_sec'
# Extra output of a Cross-SEC model: the (K, num_tasks, channels) channel
# descriptors the de-correlation loss reads (losses.decorrelation_loss).
TASK_DESCRIPTORS = 'task_descriptors'
# Sown into the 'intermediates' collection: {task: (K, width) features its
# head reads}, for the leakage probes (leakage.py).
TASK_FEATURES = 'task_features'

_POOL_KERNEL, _POOL_STRIDE = 3, 2  # max1, max2, pool5
# Crops arrive as RGB in [0, 1]; the trunk first maps them to about zero mean
# and unit scale, (x - 0.5) / 0.25 (the role of AlexNet's mean-image
# subtraction). Fixed public constants on purpose: statistics estimated from
# the training images would be computed from private data outside the clip.
# On the synthetic demo data this took a non-private gender-only model from
# 0.57 to 0.63 accuracy after three epochs.
PIXEL_MEAN, PIXEL_SCALE = 0.5, 0.25


@dataclasses.dataclass(frozen=True)
class HyperFaceConfig:
  """Architecture hyper-parameters shared by the trunk and the heads.

  Attributes:
    input_size: side of the square input crops, in pixels.
    width_multiplier: scales every hidden width (conv filters, conv_all,
      fc_full, the 512-unit head layers); output sizes are fixed.
    conv1_kernel: conv1 kernel size (paper: 11).
    conv1_stride: conv1 stride (paper: 4).
    dropout_rate: dropout after fc_full and after each head's hidden layer.
    group_norm_groups: if set, GroupNorm with this many groups after every
      convolution (per crop, so still per example); None means no norm layer.
    task_features: ``'shared'`` (HyperFace: every head reads fc_full) or
      ``'cross_sec'``: one Cross-SEC gate per task on conv_all's map
      (cross_sec.py), each gated map through the one fc_full layer, and each
      head reading only its own task's features.
    cross_task_gates: with ``'cross_sec'``, each task's gate also sees the
      other tasks' descriptors (cross_sec.py, step 3).
  """

  input_size: int = 227
  width_multiplier: float = 1.0
  conv1_kernel: int = 11
  conv1_stride: int = 4
  dropout_rate: float = 0.5
  group_norm_groups: int | None = None
  task_features: str = SHARED
  cross_task_gates: bool = True

  def __post_init__(self):
    if self.task_features not in TASK_FEATURE_KINDS:
      raise ValueError(f'task_features={self.task_features!r}: use one of '
                       f'{TASK_FEATURE_KINDS}.')

  @classmethod
  def small(cls) -> 'HyperFaceConfig':
    """A CPU-sized variant for tests and demos: 64x64 crops, 1/8 widths.

    conv1 uses kernel 5, stride 2, so the feature maps are 30 -> max1 14 ->
    max2 6 -> pool5 2, with conv1a kernel/stride 7 and conv3a kernel/stride 3.
    """
    return cls(input_size=64, width_multiplier=0.125, conv1_kernel=5,
               conv1_stride=2)

  def width(self, paper_width: int) -> int:
    """Scaled width of a layer that has ``paper_width`` units in the paper."""
    return max(1, round(paper_width * self.width_multiplier))


@dataclasses.dataclass(frozen=True)
class TrunkGeometry:
  """Spatial sizes of the trunk's feature maps and the fusion kernels."""

  conv1_size: int
  max1_size: int  # also conv2's size (stride 1, 'same' padding)
  max2_size: int  # also conv3 / conv4 / conv5's size
  pool5_size: int
  conv1a_kernel: int
  conv1a_stride: int
  conv3a_kernel: int
  conv3a_stride: int


def _valid_size(size: int, kernel: int, stride: int) -> int:
  return (size - kernel) // stride + 1


def _fusion_kernel(in_size: int, out_size: int) -> tuple[int, int]:
  """Kernel and stride of a VALID conv that maps ``in_size`` to ``out_size``.

  Prefers non-overlapping windows (kernel = stride = in // out, the paper's
  choice); if that leaves one window too many, the kernel grows to
  ``in - (out - 1) * stride`` so exactly ``out_size`` windows fit.
  """
  stride = in_size // out_size
  kernel = stride
  if _valid_size(in_size, kernel, stride) != out_size:
    kernel = in_size - (out_size - 1) * stride
  return kernel, stride


def trunk_geometry(config: HyperFaceConfig) -> TrunkGeometry:
  """Computes the feature-map sizes and the conv1a / conv3a kernels.

  >>> g = trunk_geometry(HyperFaceConfig())
  >>> g.conv1_size, g.max1_size, g.max2_size, g.pool5_size
  (55, 27, 13, 6)
  >>> g.conv1a_kernel, g.conv1a_stride, g.conv3a_kernel, g.conv3a_stride
  (4, 4, 2, 2)

  Raises:
    ValueError: if the input is too small to reach a pool5 of at least 1x1.
  """
  conv1_size = _valid_size(config.input_size, config.conv1_kernel,
                           config.conv1_stride)
  max1_size = _valid_size(conv1_size, _POOL_KERNEL, _POOL_STRIDE)
  max2_size = _valid_size(max1_size, _POOL_KERNEL, _POOL_STRIDE)
  pool5_size = _valid_size(max2_size, _POOL_KERNEL, _POOL_STRIDE)
  if pool5_size < 1:
    raise ValueError(
        f'input_size={config.input_size} with conv1 kernel '
        f'{config.conv1_kernel}, stride {config.conv1_stride} leaves no '
        'spatial extent at pool5; use a smaller conv1 kernel/stride.')
  conv1a_kernel, conv1a_stride = _fusion_kernel(max1_size, pool5_size)
  conv3a_kernel, conv3a_stride = _fusion_kernel(max2_size, pool5_size)
  return TrunkGeometry(conv1_size, max1_size, max2_size, pool5_size,
                       conv1a_kernel, conv1a_stride, conv3a_kernel,
                       conv3a_stride)


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (_POOL_KERNEL, _POOL_KERNEL),
                     strides=(_POOL_STRIDE, _POOL_STRIDE), padding='VALID')


class HyperFaceTrunk(nn.Module):
  """AlexNet trunk + HyperFace fusion, up to the fc_full feature vector.

  Shared by :class:`HyperFace` and any single-task model, so that detection
  pre-training (DPLH 3.2.1) can initialize the multi-task model's trunk.
  With ``task_features='cross_sec'`` it gates conv_all's map once per task
  (``cross_sec.CrossSEC``) and runs the one fc_full layer on all the gated
  maps in a single call (so one-pass clipping sees each weight read once).
  """

  config: HyperFaceConfig

  def _conv(self, x: jax.Array, paper_filters: int, kernel: int, stride: int,
            padding: int, name: str) -> jax.Array:
    cfg = self.config
    x = nn.Conv(cfg.width(paper_filters), (kernel, kernel),
                strides=(stride, stride),
                padding=((padding, padding), (padding, padding)), name=name)(x)
    if cfg.group_norm_groups is not None:
      x = nn.GroupNorm(num_groups=cfg.group_norm_groups, name=f'{name}_norm')(x)
    return nn.relu(x)

  @nn.compact
  def __call__(self, crops: jax.Array, *, deterministic: bool = True
               ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Maps crops ``(K, H, W, 3)``, RGB in [0, 1], to ``(K, fc_full width)``.

    With Cross-SEC: ``((K, num_tasks, fc_full width), (K, num_tasks,
    conv_all width))``, each task's features and channel descriptors.
    """
    cfg = self.config
    if crops.shape[-3:] != (cfg.input_size, cfg.input_size, 3):
      raise ValueError(f'expected crops (..., {cfg.input_size}, '
                       f'{cfg.input_size}, 3), got {crops.shape}')
    geo = trunk_geometry(cfg)
    pixels = (crops - PIXEL_MEAN) / PIXEL_SCALE
    conv1 = self._conv(pixels, 96, cfg.conv1_kernel, cfg.conv1_stride, 0,
                       'conv1')
    max1 = _max_pool(conv1)
    conv1a = self._conv(max1, 256, geo.conv1a_kernel, geo.conv1a_stride, 0,
                        'conv1a')
    conv2 = self._conv(max1, 256, 5, 1, 2, 'conv2')
    max2 = _max_pool(conv2)
    conv3 = self._conv(max2, 384, 3, 1, 1, 'conv3')
    conv3a = self._conv(conv3, 256, geo.conv3a_kernel, geo.conv3a_stride, 0,
                        'conv3a')
    conv4 = self._conv(conv3, 384, 3, 1, 1, 'conv4')
    conv5 = self._conv(conv4, 256, 3, 1, 1, 'conv5')
    pool5 = _max_pool(conv5)
    fused = jnp.concatenate([conv1a, conv3a, pool5], axis=-1)
    conv_all = self._conv(fused, 192, 1, 1, 0, 'conv_all')
    if cfg.task_features == CROSS_SEC:
      conv_all, descriptors = cross_sec.CrossSEC(
          TASK_NAMES, cfg.cross_task_gates, name=CROSS_SEC_GATES)(conv_all)
    flat = conv_all.reshape(conv_all.shape[:-3] + (-1,))
    fc_full = nn.relu(nn.Dense(cfg.width(3072), name='fc_full')(flat))
    features = nn.Dropout(cfg.dropout_rate)(fc_full,
                                            deterministic=deterministic)
    if cfg.task_features == CROSS_SEC:
      return features, descriptors
    return features


class TaskHead(nn.Module):
  """One task's head: dense (512 in the paper) + ReLU + dropout + output."""

  config: HyperFaceConfig
  output_size: int

  @nn.compact
  def __call__(self, features: jax.Array, *, deterministic: bool = True
               ) -> jax.Array:
    hidden = nn.relu(nn.Dense(self.config.width(512), name='hidden')(features))
    hidden = nn.Dropout(self.config.dropout_rate)(
        hidden, deterministic=deterministic)
    return nn.Dense(self.output_size, name='output')(hidden)


class HyperFace(nn.Module):
  """Multi-task HyperFace: detection, landmarks, visibility, pose, gender.

  Attributes:
    config: architecture hyper-parameters.
    learn_task_weights: if True, the module owns a ``log_sigma_sq`` parameter
      of shape ``(len(TASK_NAMES),)`` (zeros, i.e. sigma = 1) for DPLH's
      uncertainty weighting (Eq. 7). It lives in the same 'params' collection as
      the network weights on purpose: the weights are learned from private data,
      so they must be inside each example's clipped gradient and receive the
      same Gaussian noise (docs/DESIGN.md, Privacy rules, rule 4). Keeping them
      outside the per-example gradient would let them learn from unclipped data.
  """

  config: HyperFaceConfig = HyperFaceConfig()
  learn_task_weights: bool = True

  @nn.compact
  def __call__(self, crops: jax.Array, *, deterministic: bool = True
               ) -> dict[str, jax.Array]:
    """Runs one image's proposals.

    Args:
      crops: ``(K, H, W, 3)`` float crops of one image (or any leading shape).
      deterministic: disables dropout; when False, pass
        ``rngs={'dropout': key}`` to ``apply``.

    Returns:
      A dict keyed by task name with ``(K, TASK_OUTPUT_SIZES[task])`` outputs:
      detection and gender are logits, the rest are regressions. A Cross-SEC
      model adds ``TASK_DESCRIPTORS``, ``(K, num_tasks, channels)``. The
      features each head reads are sown as ``TASK_FEATURES`` into
      'intermediates' (read with ``mutable=['intermediates']``).
    """
    if self.learn_task_weights:
      # Declared here (not in the loss) so it is a trainable model parameter;
      # the loss reads it back from the params tree under LOG_SIGMA_SQ.
      self.param(LOG_SIGMA_SQ, nn.initializers.zeros, (len(TASK_NAMES),),
                 jnp.float32)
    trunk = HyperFaceTrunk(self.config, name=TRUNK)(
        crops, deterministic=deterministic)
    extra = {}
    if self.config.task_features == CROSS_SEC:
      per_task, extra[TASK_DESCRIPTORS] = trunk
      features = {task: per_task[..., i, :]
                  for i, task in enumerate(TASK_NAMES)}
    else:
      features = {task: trunk for task in TASK_NAMES}
    self.sow('intermediates', TASK_FEATURES, features)
    return {
        task: TaskHead(self.config, TASK_OUTPUT_SIZES[task],
                       name=f'{task}_head')(features[task],
                                            deterministic=deterministic)
        for task in TASK_NAMES
    } | extra


def apply_to_images(model: nn.Module, params, crops: jax.Array,
                    dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
  """Runs ``model`` on the crops ``(B, K, H, W, 3)`` of B images at once.

  The B*K crops go through as one batch (for evaluation and the non-private
  step), which is faster on CPU than a vmap over images.

  Args:
    model: HyperFace (or any module mapping ``(N, H, W, 3)`` crops to a dict
      of ``(N, ...)`` outputs).
    params: its variables.
    crops: ``(B, K, H, W, 3)``.
    dropout_rng: None for no dropout; otherwise the dropout key.

  Returns:
    The outputs with leading ``(B, K)`` axes.
  """
  flat = crops.reshape((-1,) + crops.shape[2:])
  if dropout_rng is None:
    outputs = model.apply(params, flat, deterministic=True)
  else:
    outputs = model.apply(params, flat, deterministic=False,
                          rngs={'dropout': dropout_rng})
  return jax.tree.map(lambda o: o.reshape(crops.shape[:2] + o.shape[1:]),
                      outputs)


# Flax's lecun_normal draws a standard normal truncated to [-2, 2] and divides
# by that distribution's std (0.8796...) so the kernel std is sqrt(1/fan_in).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def _truncated_standard_normal(rng: np.random.Generator, shape) -> np.ndarray:
  values = rng.standard_normal(shape)
  outside = np.abs(values) > 2.0
  while outside.any():  # Rejection sampling; ~5% redrawn per round.
    values[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(values) > 2.0
  return values


def init_variables(model: nn.Module, seed: int = 0) -> dict:
  """Initializes HyperFace variables on the host with NumPy.

  Draws the distributions of ``model.init``'s defaults (truncated LeCun
  normal kernels, zero biases, unit GroupNorm scales, zero log sigma^2) but
  compiles nothing. Why: XLA on CPU compiles each of Flax's per-parameter
  threefry draws separately, so ``jax.jit(model.init)`` compiles for many
  seconds even for the small config, which tests and short CPU runs would
  pay for nothing. The values differ from ``model.init``'s (another RNG),
  not their distribution.
  Initialization reads no private data, so the choice has no privacy effect.

  Args:
    model: a module with a ``config`` attribute (HyperFace).
    seed: NumPy seed.

  Returns:
    Variables with exactly the tree, shapes and dtypes of ``model.init``.

  Raises:
    ValueError: on a leaf whose initializer is not one of the above.
  """
  size = model.config.input_size
  abstract = jax.eval_shape(
      model.init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def init_leaf(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    name = path[-1].key
    if name == 'kernel':
      fan_in = math.prod(leaf.shape[:-1])
      values = _truncated_standard_normal(rng, leaf.shape) * (
          math.sqrt(1.0 / fan_in) / _TRUNCATED_NORMAL_STD)
    elif name == 'scale':
      values = np.ones(leaf.shape)
    elif name in ('bias', LOG_SIGMA_SQ):
      values = np.zeros(leaf.shape)
    else:
      raise ValueError(f'No host initializer for parameter {path}.')
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(init_leaf, abstract)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
