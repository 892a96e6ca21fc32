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

from dplh_jax.hyperface.datasets import head_model


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


def _palette(look: Appearance) -> np.ndarray:
  """Colours of the texture's materials, indexed like _texture's ids.

  Partly transparent features (brows, nose bridge, beard) only ever lie on
  bare skin, so their blended colour is a constant too.
  """
  skin, hair = look.skin, look.hair
  return np.stack([
      skin,                                   # 0 skin
      skin * 0.8, skin * 0.6,                 # 1 ear, 2 ear rim
      skin + 0.9 * (hair * 0.7 - skin),       # 3 brow
      skin * 0.45, np.array([0.92, 0.92, 0.9]),  # 4 eyelid, 5 eye white
      look.iris, np.zeros(3),                 # 6 iris, 7 pupil
      skin * 0.82, skin * 0.3,                # 8 nose bridge, 9 nostril
      skin + look.beard * (hair - skin),      # 10 beard
      look.lips, look.lips * 0.35,            # 11 lips, 12 lip line
      hair,                                   # 13 hair
  ]).astype(np.float32)


def _texture(hx: np.ndarray, hy: np.ndarray, hz: np.ndarray,
             look: Appearance) -> np.ndarray:
  """Albedo of the head surface at template coordinates (hx, hy, hz).

  Paints material ids (later features over earlier ones) and looks their
  colours up once: cheaper than blending colours feature by feature.
  """
  material = np.zeros(hx.shape, np.uint8)
  ax = np.abs(hx)
  front = hz > 0.0
  # Ears: a darker patch with a dark rim on each side of the head.
  ear = (((ax - 0.9) / 0.08) ** 2 + ((hy - 0.03) / 0.16) ** 2) < 1.0
  material[ear] = 1
  material[ear & (np.abs(hy - 0.03) > 0.1)] = 2
  # Brows: arched bands, thicker on (most) men.
  brow_center = 0.52 - 0.9 * (ax - 0.40) ** 2
  material[front & (np.abs(ax - 0.40) < 0.27)
           & (np.abs(hy - brow_center) < look.brow_thickness)] = 3
  # Eyes: eyelid outline, white, iris and pupil.
  eye_r2 = ((ax - 0.37) / 0.19) ** 2 + ((hy - 0.225) / 0.085) ** 2
  material[front & (eye_r2 < 1.45)] = 4
  material[front & (eye_r2 < 1.0)] = 5
  iris_r2 = (ax - 0.37) ** 2 + (hy - 0.225) ** 2
  material[front & (iris_r2 < 0.07 ** 2)] = 6
  material[front & (iris_r2 < 0.032 ** 2)] = 7
  # Nose: a shaded bridge and two nostrils.
  material[front & (ax > 0.06) & (ax < 0.12) & (hy > -0.2) & (hy < 0.18)] = 8
  material[front & ((((ax - 0.085) / 0.055) ** 2
                     + ((hy + 0.24) / 0.035) ** 2) < 1.0)] = 9
  # Beard below the nose, then the mouth on top of it.
  if look.beard > 0:
    material[front & (hy < -0.35) & (hy > -1.1) & (ax < 0.75)] = 10
  mouth = front & (((hx / 0.31) ** 2 + ((hy + 0.58) / look.lip_height) ** 2)
                   < 1.0)
  material[mouth] = 11
  material[mouth & (np.abs(hy + 0.58) < 0.015)] = 12
  # Hair: cap above the hairline and at the back; long hair covers the sides.
  hairline = look.hairline - 0.2 * hx ** 2
  back = (hz < 0.25) & (hy > -0.75) if look.long_hair else (
      (hz < -0.1) & (hy > -0.3))
  material[(hy > hairline) | back] = 13
  return _palette(look)[material]


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
