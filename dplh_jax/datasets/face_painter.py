"""Paints a posed ellipsoid head onto a float RGB canvas with NumPy.

Facial features (eyes, brows, nose, mouth, ears, hair, beard) are painted as
a texture in head-frame coordinates of the visible surface point under each
pixel, so they rotate, foreshorten and disappear behind the head exactly as
the landmark labels of head_model say. The texture coordinates are those of
the 0.92 x 1.2 template head (scaled heads are normalised back).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dplh_jax.datasets import head_model


class Appearance(NamedTuple):
  """Everything but geometry that decides how a face looks."""
  skin: np.ndarray            # (3,) RGB in [0, 1]
  hair: np.ndarray            # (3,)
  lips: np.ndarray            # (3,)
  iris: np.ndarray            # (3,)
  brow_thickness: float       # half thickness, template units
  lip_height: float           # half height of the mouth ellipse
  hairline: float             # template y where the hair starts
  long_hair: bool
  beard: float                # 0 none .. 1 full
  light: np.ndarray           # (3,) unit vector towards the light, camera
  ambient: float


def _region(box_xywh: np.ndarray, canvas_shape: tuple[int, ...],
            margin: int = 2):
  """Integer row/column slices covering the box, clipped to the canvas."""
  height, width = canvas_shape[:2]
  x0 = int(np.clip(np.floor(box_xywh[0]) - margin, 0, width))
  y0 = int(np.clip(np.floor(box_xywh[1]) - margin, 0, height))
  x1 = int(np.clip(np.ceil(box_xywh[0] + box_xywh[2]) + margin, 0, width))
  y1 = int(np.clip(np.ceil(box_xywh[1] + box_xywh[3]) + margin, 0, height))
  return slice(y0, y1), slice(x0, x1)


def _pixel_grid(posed: head_model.PosedHead, rows: slice, cols: slice):
  """Camera-frame (x, y) in head units of the pixel centres in a region."""
  v = np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5
  u = np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5
  x = (u[None, :] - np.float32(posed.center[0])) / np.float32(posed.scale)
  y = (np.float32(posed.center[1]) - v[:, None]) / np.float32(posed.scale)
  return np.broadcast_arrays(x, y)


def _blend(pixels: np.ndarray, mask: np.ndarray, color, alpha=1.0) -> None:
  """In place: pixels[mask] <- (1 - alpha) pixels[mask] + alpha color."""
  if alpha >= 1.0:
    pixels[mask] = color
  elif alpha > 0.0:
    selected = pixels[mask]
    pixels[mask] = selected + np.float32(alpha) * (color - selected)


def _paint_long_hair(canvas: np.ndarray, posed: head_model.PosedHead,
                     color: np.ndarray) -> None:
  """A flat hair curtain behind the head, hanging below the chin."""
  a, b, c = posed.head.semi_axes.astype(np.float32)
  half = posed.scale * 1.8 * max(a, b)
  box = np.array([posed.center[0] - half, posed.center[1] - half,
                  2 * half, 2.4 * half])
  rows, cols = _region(box, canvas.shape)
  if rows.stop <= rows.start or cols.stop <= cols.start:
    return
  x, y = _pixel_grid(posed, rows, cols)
  r = posed.rotation.astype(np.float32)
  if abs(r[2, 2]) < 1e-3:
    return
  plane_z = -0.3 * c
  z = (plane_z - r[0, 2] * x - r[1, 2] * y) / r[2, 2]
  hx = r[0, 0] * x + r[1, 0] * y + r[2, 0] * z
  hy = r[0, 1] * x + r[1, 1] * y + r[2, 1] * z
  inside = ((hx / (1.25 * a)) ** 2 + ((hy + 0.25 * b) / (1.25 * b)) ** 2
            < 1.0) & (hy < 0.9 * b)
  canvas[rows, cols][inside] = color * 0.8


def _texture(hx: np.ndarray, hy: np.ndarray, hz: np.ndarray,
             look: Appearance) -> np.ndarray:
  """Albedo of the head surface at template coordinates (hx, hy, hz)."""
  albedo = np.empty(hx.shape + (3,), np.float32)
  albedo[:] = look.skin
  ax = np.abs(hx)
  front = hz > 0.0
  # Ears: a darker patch with a dark rim on each side of the head.
  ear = (((ax - 0.9) / 0.08) ** 2 + ((hy - 0.03) / 0.16) ** 2) < 1.0
  _blend(albedo, ear, look.skin * 0.8)
  _blend(albedo, ear & (np.abs(hy - 0.03) > 0.1), look.skin * 0.6)
  # Brows: arched bands, thicker on (most) men.
  brow_center = 0.52 - 0.9 * (ax - 0.40) ** 2
  brow = front & (np.abs(ax - 0.40) < 0.27) & (
      np.abs(hy - brow_center) < look.brow_thickness)
  _blend(albedo, brow, look.hair * 0.7, 0.9)
  # Eyes: eyelid outline, white, iris and pupil.
  eye_r2 = ((ax - 0.37) / 0.19) ** 2 + ((hy - 0.225) / 0.085) ** 2
  _blend(albedo, front & (eye_r2 < 1.45), look.skin * 0.45)
  _blend(albedo, front & (eye_r2 < 1.0), np.array([0.92, 0.92, 0.9]))
  iris_r2 = (ax - 0.37) ** 2 + (hy - 0.225) ** 2
  _blend(albedo, front & (iris_r2 < 0.07 ** 2), look.iris)
  _blend(albedo, front & (iris_r2 < 0.032 ** 2), np.zeros(3))
  # Nose: a shaded bridge and two nostrils.
  bridge = front & (ax > 0.06) & (ax < 0.12) & (hy > -0.2) & (hy < 0.18)
  _blend(albedo, bridge, look.skin * 0.7, 0.6)
  nostril = front & ((((ax - 0.085) / 0.055) ** 2
                      + ((hy + 0.24) / 0.035) ** 2) < 1.0)
  _blend(albedo, nostril, look.skin * 0.3)
  # Beard below the nose, then the mouth on top of it.
  beard = front & (hy < -0.35) & (hy > -1.1) & (ax < 0.75)
  _blend(albedo, beard, look.hair, look.beard)
  mouth = front & (((hx / 0.31) ** 2 + ((hy + 0.58) / look.lip_height) ** 2)
                   < 1.0)
  _blend(albedo, mouth, look.lips)
  _blend(albedo, mouth & (np.abs(hy + 0.58) < 0.015), look.lips * 0.35)
  # Hair: cap above the hairline and at the back; long hair covers the sides.
  hairline = look.hairline - 0.2 * hx ** 2
  back = (hz < 0.25) & (hy > -0.75) if look.long_hair else (
      (hz < -0.1) & (hy > -0.3))
  _blend(albedo, (hy > hairline) | back, look.hair)
  return albedo


def paint_face(canvas: np.ndarray, posed: head_model.PosedHead,
               look: Appearance) -> None:
  """Paints the posed head onto canvas (H, W, 3) float32 in place."""
  if look.long_hair:
    _paint_long_hair(canvas, posed, look.hair)
  rows, cols = _region(head_model.silhouette_box(posed), canvas.shape)
  if rows.stop <= rows.start or cols.stop <= cols.start:
    return
  x, y = _pixel_grid(posed, rows, cols)
  m = posed.ellipsoid_matrix().astype(np.float32)  # float32 halves the cost
  rotation = posed.rotation.astype(np.float32)
  # Front intersection of the viewing ray through (x, y) with the surface.
  qa = m[2, 2]
  qb = m[0, 2] * x + m[1, 2] * y
  qc = m[0, 0] * x * x + 2 * m[0, 1] * x * y + m[1, 1] * y * y - 1.0
  discriminant = qb * qb - qa * qc
  on_head = discriminant >= 0.0
  # From here on only the pixels showing the head are computed, as 1-D arrays.
  x, y = x[on_head], y[on_head]
  z = (-qb[on_head] + np.sqrt(discriminant[on_head])) / qa
  # Explicit 3x3 products: numpy's matmul is slow for an inner size of 3.
  r, c3 = rotation, (x, y, z)
  a, b, c = posed.head.semi_axes.astype(np.float32)
  hx = (r[0, 0] * x + r[1, 0] * y + r[2, 0] * z) * (0.92 / a)
  hy = (r[0, 1] * x + r[1, 1] * y + r[2, 1] * z) * (1.2 / b)
  hz = (r[0, 2] * x + r[1, 2] * y + r[2, 2] * z) / c
  normal = [m[i, 0] * c3[0] + m[i, 1] * c3[1] + m[i, 2] * c3[2]
            for i in range(3)]
  length = np.sqrt(normal[0] ** 2 + normal[1] ** 2 + normal[2] ** 2) + 1e-9
  light = look.light
  lit = (normal[0] * light[0] + normal[1] * light[1]
         + normal[2] * light[2]) / length
  diffuse = np.maximum(lit, 0.0)
  shade = look.ambient + (1.0 - look.ambient) * diffuse
  canvas[rows, cols][on_head] = _texture(hx, hy, hz, look) * shade[:, None]
