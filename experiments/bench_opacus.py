"""The torch variants of experiments/bench_dp_step.py: Opacus on HyperFace.

``opacus`` is the DP step in Opacus, ``torch_nonprivate`` the same model and
loss with plain Adam (Opacus's same-framework baseline). Imported only when
one is requested, so the benchmark runs without torch. Needs the ``bench``
extra (``pip install -e '.[bench]'``: torch, opacus).

What is built, to match the JAX variants:

* Architecture: ``dplh_jax.hyperface.models.HyperFace`` for the benchmark's config
  (conv1 .. conv_all, fc_full, five heads, the 5 learned log sigma^2 task
  weights), in torch, initialized with the JAX variants' initial parameters
  (converted to torch layouts). :func:`build_step` checks the parameter
  count, and the per-image losses and per-image gradient norms against
  JAX's (``losses.per_image_loss``, ``jax.vmap(jax.grad(...))``).
* Input: the same batch, crops transposed once (outside the timing) from
  ``(B, K, H, W, 3)`` to torch's ``(B, K, 3, H, W)``.
* Loss: ``dplh_jax.hyperface.losses`` (DPLH Eq. 1-5 with the detection-ignore,
  positive, visibility and unknown-gender masks) and uncertainty weighting
  ``sum_i 0.5 exp(-s_i) L_i + s_i [n_i > 0]``. The ``has_*`` availability
  masks are not implemented (the benchmark batch has none).
* Privacy unit = the image: every layer takes ``(B, K, ...)``, so Opacus's
  per-sample axis (dim 0) is the image and each per-example gradient covers
  the image's K proposals. The log sigma^2 weights are a module of their
  own, inside the clip.
* Step: ``GradSampleModule`` (per-example gradients), then Opacus's
  ``DPOptimizer`` over ``torch.optim.Adam`` (what ``PrivacyEngine.
  make_private`` builds, without its data loader): clip each image's gradient to
  ``l2_norm_clip``, sum, add N(0, (sigma C)^2), divide by the expected batch
  size, Adam step. The same clip, noise multiplier, expected batch size and
  learning rate as the JAX DP variants. Poisson sampling (Opacus's
  ``DPDataLoader``) is left out: all variants time one fixed batch.

Per-example gradients (``grad_sample_mode``): the convolutions are
``_ProposalConv`` modules with raw parameters on 5-D input, which Opacus
has no grad sampler for, so it computes theirs with ``torch.func``
(vmap over the image axis of a per-layer grad); so does the weighting
module. ``'hooks'`` (default) uses Opacus's own einsum grad sampler for the
``nn.Linear`` layers (it sums over the K axis: per image), ``'functorch'``
forces torch.func for every layer. Both give the same gradients; hooks was
the faster on the 2-core CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import opacus
from opacus import optimizers as opacus_optimizers
import torch
from torch import nn
from torch.nn import functional as F

from dplh_jax.hyperface import models

TASKS = models.TASK_NAMES
GRAD_SAMPLE_MODES = ('hooks', 'functorch')


class _ProposalConv(nn.Module):
  """Conv2d (+ ReLU) on ``(B, K, C, H, W)``: per image, K crops each."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int,
               stride: int, padding: int):
    super().__init__()
    self.weight = nn.Parameter(
        torch.zeros(out_channels, in_channels, kernel, kernel))
    self.bias = nn.Parameter(torch.zeros(out_channels))
    self.stride, self.padding = stride, padding

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(x.flatten(0, 1), self.weight, self.bias, self.stride,
                 self.padding)
    return F.relu(y).unflatten(0, x.shape[:2])


class _TaskWeighting(nn.Module):
  """Owns log sigma^2; ``(B, 5, 2)`` [task loss, task present] -> ``(B,)``."""

  def __init__(self):
    super().__init__()
    self.log_sigma_sq = nn.Parameter(torch.zeros(len(TASKS)))

  def forward(self, losses_present: torch.Tensor) -> torch.Tensor:
    s = self.log_sigma_sq
    return torch.sum(0.5 * torch.exp(-s) * losses_present[..., 0]
                     + s * losses_present[..., 1], dim=-1)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
  return F.max_pool2d(x.flatten(0, 1), 3, 2).unflatten(0, x.shape[:2])


def _masked_mean(values, mask):
  """Per image: mean of ``values`` where ``mask`` (0 if none), and count."""
  mask = mask.expand_as(values)
  dims = tuple(range(1, values.dim()))
  count = mask.sum(dims).float()
  total = torch.where(mask, values, 0.0).sum(dims)
  return total / count.clamp(min=1.0), count


def _cross_entropy(logits, labels, mask):
  ce = F.cross_entropy(logits.flatten(0, 1),
                       torch.where(mask, labels, 0).flatten(),
                       reduction='none').view(labels.shape)
  return _masked_mean(ce, mask)


def task_losses(out: dict, t: dict) -> torch.Tensor:
  """``dplh_jax.hyperface.losses.task_losses`` for a batch: ``(B, 5, 2)`` per image
  [loss, present] in TASK_NAMES order."""
  positive = t['detection_label'] == 1
  visible = positive[..., None] & (t['visibility'] > 0.5)
  pose_target = torch.where(positive[..., None], t['pose'], 0.0)
  results = [
      _cross_entropy(out['detection'], t['detection_label'],
                     t['detection_label'] >= 0),
      _masked_mean(0.5 * torch.sum(
          (out['landmarks'].unflatten(-1, (-1, 2))
           - torch.where(visible[..., None], t['landmarks'], 0.0)) ** 2,
          dim=-1), visible),
      _masked_mean((out['visibility'] - torch.where(
          positive[..., None], t['visibility'], 0.0)) ** 2,
                   positive[..., None].expand_as(t['visibility'])),
      _masked_mean(torch.mean((out['pose'] - pose_target) ** 2, dim=-1),
                   positive),
      _cross_entropy(out['gender'], t['gender'],
                     positive & (t['gender'] >= 0)),
  ]
  return torch.stack([torch.stack([loss, (count > 0).float()], dim=-1)
                      for loss, count in results], dim=1)


class TorchHyperFace(nn.Module):
  """``models.HyperFace`` (no GroupNorm) whose forward is the per-image loss.

  ``forward(crops (B, K, 3, H, W), targets) -> (B,)`` per-image losses.
  Dropout is not implemented (the benchmark configs use rate 0).
  """

  def __init__(self, cfg: models.HyperFaceConfig):
    super().__init__()
    if cfg.group_norm_groups is not None or cfg.dropout_rate:
      raise ValueError('GroupNorm and dropout are not implemented in torch.')
    geo = models.trunk_geometry(cfg)
    w = cfg.width
    self.convs = nn.ModuleDict({
        'conv1': _ProposalConv(3, w(96), cfg.conv1_kernel, cfg.conv1_stride,
                               0),
        'conv1a': _ProposalConv(w(96), w(256), geo.conv1a_kernel,
                                geo.conv1a_stride, 0),
        'conv2': _ProposalConv(w(96), w(256), 5, 1, 2),
        'conv3': _ProposalConv(w(256), w(384), 3, 1, 1),
        'conv3a': _ProposalConv(w(384), w(256), geo.conv3a_kernel,
                                geo.conv3a_stride, 0),
        'conv4': _ProposalConv(w(384), w(384), 3, 1, 1),
        'conv5': _ProposalConv(w(384), w(256), 3, 1, 1),
        'conv_all': _ProposalConv(3 * w(256), w(192), 1, 1, 0),
    })
    self.fc_full = nn.Linear(w(192) * geo.pool5_size ** 2, w(3072))
    self.heads = nn.ModuleDict({task: nn.ModuleDict({
        'hidden': nn.Linear(w(3072), w(512)),
        'output': nn.Linear(w(512), models.TASK_OUTPUT_SIZES[task]),
    }) for task in TASKS})
    self.weighting = _TaskWeighting()

  def outputs(self, crops: torch.Tensor) -> dict:
    c = self.convs
    pixels = (crops - models.PIXEL_MEAN) / models.PIXEL_SCALE
    max1 = _max_pool(c['conv1'](pixels))
    conv3 = c['conv3'](_max_pool(c['conv2'](max1)))
    pool5 = _max_pool(c['conv5'](c['conv4'](conv3)))
    fused = torch.cat([c['conv1a'](max1), c['conv3a'](conv3), pool5], dim=2)
    # JAX flattens (h, w, c); load_jax_params permutes fc_full to match.
    features = F.relu(self.fc_full(c['conv_all'](fused).flatten(2)))
    return {task: head['output'](F.relu(head['hidden'](features)))
            for task, head in self.heads.items()}

  def forward(self, crops: torch.Tensor, targets: dict) -> torch.Tensor:
    return self.weighting(task_losses(self.outputs(crops), targets))


def load_jax_params(module: TorchHyperFace, params,
                    cfg: models.HyperFaceConfig) -> None:
  """Copies HyperFace's Flax variables into ``module`` (torch layouts)."""
  p = params['params']

  def t(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, np.float32))

  with torch.no_grad():
    for name, conv in module.convs.items():
      conv.weight.copy_(t(p[models.TRUNK][name]['kernel']).permute(3, 2, 0, 1))
      conv.bias.copy_(t(p[models.TRUNK][name]['bias']))
    size = models.trunk_geometry(cfg).pool5_size
    kernel = t(p[models.TRUNK]['fc_full']['kernel'])  # (h * w * c, out)
    kernel = kernel.unflatten(0, (size, size, -1)).permute(3, 2, 0, 1)
    module.fc_full.weight.copy_(kernel.flatten(1))
    module.fc_full.bias.copy_(t(p[models.TRUNK]['fc_full']['bias']))
    for task, head in module.heads.items():
      for layer in ('hidden', 'output'):
        head[layer].weight.copy_(t(p[f'{task}_head'][layer]['kernel']).T)
        head[layer].bias.copy_(t(p[f'{task}_head'][layer]['bias']))
    module.weighting.log_sigma_sq.copy_(t(p[models.LOG_SIGMA_SQ]))


def to_torch_batch(batch: dict) -> tuple[torch.Tensor, dict]:
  """The benchmark's NumPy batch as ``(crops (B, K, 3, H, W), targets)``."""
  crops = torch.from_numpy(np.ascontiguousarray(
      np.moveaxis(batch['crops'], -1, 2)))
  targets = {key: torch.from_numpy(np.asarray(batch[key]))
             for key in ('landmarks', 'visibility', 'pose')}
  for key in ('detection_label', 'gender'):
    targets[key] = torch.from_numpy(np.asarray(batch[key], np.int64))
  return crops, targets


def per_image_grad_norms(module: nn.Module) -> np.ndarray:
  """Norms of the per-image gradients Opacus stored (before clipping)."""
  squares = sum(p.grad_sample.flatten(1).pow(2).sum(1)
                for p in module.parameters())
  return np.sqrt(squares.detach().numpy())


def build_step(model_cfg: models.HyperFaceConfig, params, batch: dict, *,
               l2_norm_clip: float, noise_multiplier: float,
               expected_batch_size: int, learning_rate: float,
               jax_losses: np.ndarray, jax_grad_norms: np.ndarray,
               grad_sample_mode: str = 'hooks',
               num_threads: int | None = None, dp: bool = True):
  """One Opacus DP step on ``batch``, as a blocking no-argument callable.

  Args:
    model_cfg: the JAX model's architecture.
    params: the JAX model's initial variables (copied in).
    batch: the benchmark's NumPy batch (all images real).
    l2_norm_clip: per-image clip norm C.
    noise_multiplier: sigma; the noise std is sigma * C on the clipped sum.
    expected_batch_size: divisor of the noisy sum.
    learning_rate: Adam's.
    jax_losses: ``(B,)`` per-image losses of the JAX model at ``params``.
    jax_grad_norms: ``(B,)`` norms of its per-image gradients there. Opacus's
      per-image gradients (before clipping) must reproduce both.
    grad_sample_mode: one of GRAD_SAMPLE_MODES (module docstring).
    num_threads: torch intra-op threads (default: all CPUs).
    dp: False for the non-private baseline: the same module and loss, plain
      ``torch.optim.Adam``, no Opacus (``jax_grad_norms`` unused).

  Returns:
    ``(step, info)``: ``step()`` runs forward, backward with per-image
    gradients, clipping, noise and the Adam update; ``info`` has the
    versions, the mode, the parameter count and the checks' differences.

  Raises:
    ValueError: if the parameter count, the losses or the gradient norms
      differ from JAX's.
  """
  # Expected: the crops (conv1's input) need no gradient.
  warnings.filterwarnings('ignore', message='Full backward hook is firing')
  if grad_sample_mode not in GRAD_SAMPLE_MODES:
    raise ValueError(f'grad_sample_mode={grad_sample_mode!r}: use one of '
                     f'{GRAD_SAMPLE_MODES}.')
  torch.set_num_threads(num_threads or torch.get_num_threads())
  module = TorchHyperFace(model_cfg)
  count = sum(p.numel() for p in module.parameters())
  if count != models.count_params(params):
    raise ValueError(f'torch HyperFace has {count} parameters, the JAX one '
                     f'{models.count_params(params)}.')
  load_jax_params(module, params, model_cfg)
  crops, targets = to_torch_batch(batch)
  with torch.no_grad():
    torch_losses = module(crops, targets).numpy()
  if not np.allclose(torch_losses, jax_losses, rtol=1e-4, atol=1e-4):
    raise ValueError('torch and JAX per-image losses differ: max |diff| = '
                     f'{np.max(np.abs(torch_losses - jax_losses)):.3g}.')
  info = {'torch': torch.__version__, 'opacus': opacus.__version__,
          'grad_sample_mode': grad_sample_mode if dp else None,
          'num_params': count, 'num_threads': torch.get_num_threads(),
          'max_loss_diff_vs_jax': float(np.max(np.abs(torch_losses
                                                      - jax_losses)))}
  if not dp:
    adam = torch.optim.Adam(module.parameters(), lr=learning_rate)

    def nonprivate_step() -> None:
      adam.zero_grad(set_to_none=True)
      module(crops, targets).mean().backward()
      adam.step()

    return nonprivate_step, info
  model = opacus.GradSampleModule(
      module, batch_first=True, loss_reduction='mean',
      force_functorch=grad_sample_mode == 'functorch')
  optimizer = opacus_optimizers.DPOptimizer(
      torch.optim.Adam(model.parameters(), lr=learning_rate),
      noise_multiplier=noise_multiplier, max_grad_norm=l2_norm_clip,
      expected_batch_size=expected_batch_size, loss_reduction='mean')
  optimizer.zero_grad(set_to_none=True)
  model(crops, targets).mean().backward()
  norms = per_image_grad_norms(module)
  optimizer.zero_grad(set_to_none=True)
  grad_diff = float(np.max(np.abs(norms - jax_grad_norms) / jax_grad_norms))
  if grad_diff > 1e-3:
    raise ValueError('Opacus and JAX per-image gradient norms differ: max '
                     f'relative difference {grad_diff:.3g}.')

  def step() -> None:
    optimizer.zero_grad(set_to_none=True)
    model(crops, targets).mean().backward()
    optimizer.step()

  return step, info | {'max_grad_norm_rel_diff_vs_jax': grad_diff}
