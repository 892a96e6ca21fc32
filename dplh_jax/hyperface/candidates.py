"""Candidate face boxes over a whole image: multi-scale sliding windows.

HyperFace scores Selective Search regions; that needs OpenCV and is slow, so
the analyzer slides windows instead (docs/DESIGN.md, Using a trained model).
Windows have the face-box aspect of the public head template
(``face_rect.TEMPLATE_ASPECT``, width / height), sides in a geometric series
from ``min_size_fraction`` to ``max_size_fraction`` of the shorter image side,
and a stride of ``stride_fraction`` of the window. Windows may reach past the
border by ``border_fraction`` of their size, because faces near the border
are cut by it and their boxes reach past it too. Nothing here depends on the
image's pixels or on any dataset, only on its size.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dplh_jax.hyperface import face_rect


@dataclasses.dataclass(frozen=True)
class WindowConfig:
  """Where the windows go.

  Attributes:
    min_size_fraction: smallest window height / shorter image side.
    max_size_fraction: largest window height / shorter image side.
    scale_step: ratio of consecutive window heights (> 1).
    stride_fraction: step between windows / window size (in (0, 1]).
    border_fraction: how far a window may reach past the border / its size.
    aspect: window width / height.
  """
  min_size_fraction: float = 0.15
  max_size_fraction: float = 1.0
  scale_step: float = 2 ** (1 / 3)
  stride_fraction: float = 0.25
  border_fraction: float = 0.2
  aspect: float = face_rect.TEMPLATE_ASPECT

  def __post_init__(self):
    if not 0 < self.min_size_fraction <= self.max_size_fraction:
      raise ValueError(
          f'min_size_fraction={self.min_size_fraction} and max_size_fraction'
          f'={self.max_size_fraction}: need 0 < min <= max.')
    if self.scale_step <= 1:
      raise ValueError(f'scale_step={self.scale_step} must be > 1.')
    if not 0 < self.stride_fraction <= 1:
      raise ValueError(f'stride_fraction={self.stride_fraction} must lie in '
                       '(0, 1].')


def _positions(length: float, size: float, stride: float,
               margin: float) -> np.ndarray:
  """Evenly spaced starts from -margin to length - size + margin, at most
  ``stride`` apart (both ends included)."""
  low, high = -margin, length - size + margin
  if high <= low:
    return np.array([(length - size) / 2])
  count = math.ceil((high - low) / stride) + 1
  return np.linspace(low, high, count)


def sliding_windows(image_hw: tuple[int, int],
                    config: WindowConfig = WindowConfig()) -> np.ndarray:
  """Every window of every scale, pixel [x, y, w, h], shape (N, 4) float32.

  >>> windows = sliding_windows((64, 64), WindowConfig(min_size_fraction=0.5))
  >>> windows.shape, float(windows[:, 3].min()), float(windows[:, 3].max())
  ((141, 4), 32.0, 64.0)
  """
  height, width = image_hw
  shorter = min(height, width)
  heights = []
  size = config.min_size_fraction * shorter
  while size <= config.max_size_fraction * shorter * (1 + 1e-6):
    heights.append(size)
    size *= config.scale_step
  boxes = []
  for box_h in heights:
    box_w = box_h * config.aspect
    xs = _positions(width, box_w, config.stride_fraction * box_w,
                    config.border_fraction * box_w)
    ys = _positions(height, box_h, config.stride_fraction * box_h,
                    config.border_fraction * box_h)
    grid_x, grid_y = np.meshgrid(xs, ys)
    boxes.append(np.stack([grid_x.ravel(), grid_y.ravel(),
                           np.full(grid_x.size, box_w),
                           np.full(grid_x.size, box_h)], axis=1))
  return np.concatenate(boxes).astype(np.float32)
