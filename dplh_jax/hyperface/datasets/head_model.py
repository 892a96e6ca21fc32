"""A 3D ellipsoid head with the 21 AFLW landmarks, posed and projected.

Head frame: x towards the viewer's right on a frontal face, y up, z towards
the viewer; the head is the ellipsoid (x/a)^2 + (y/b)^2 + (z/c)^2 = 1. Every
landmark but the nose tip lies on that surface, so (the ellipsoid being
convex and the projection orthographic) a landmark is hidden by the head
itself exactly when its surface normal points away from the camera: this is
the self-occlusion rule for visibility, and the renderer paints facial
features on the same surface, so labels and pixels agree.

Pose is (roll, pitch, yaw) in radians with camera-frame rotation
R = Rz(roll) Rx(pitch) Ry(yaw): yaw > 0 turns the nose towards the image
right, pitch > 0 tilts it down, roll > 0 rotates the face counter-clockwise
on screen. Mirroring the image (x -> -x) maps R(r, p, y) to R(-r, p, -y) and
left landmarks to right ones, which is the flip rule of face_schema.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# (x, y) on the surface, in AFLW order; z follows from the ellipsoid.
_TEMPLATE_XY = np.array([
    [-0.66, 0.42], [-0.40, 0.52], [-0.14, 0.44],   # left brow
    [0.14, 0.44], [0.40, 0.52], [0.66, 0.42],      # right brow
    [-0.56, 0.22], [-0.37, 0.23], [-0.18, 0.22],   # left eye
    [0.18, 0.22], [0.37, 0.23], [0.56, 0.22],      # right eye
    [-0.88, 0.05],                                 # left ear
    [-0.15, -0.22], [0.0, -0.25], [0.15, -0.22],   # nose left/centre/right
    [0.88, 0.05],                                  # right ear
    [-0.30, -0.58], [0.0, -0.58], [0.30, -0.58],   # mouth
    [0.0, -1.02],                                  # chin
])
NOSE_TIP = 14
NOSE_TIP_PROTRUSION = 0.25


class Head(NamedTuple):
  """Shape of one head: ellipsoid semi-axes (a, b, c) and its landmarks."""
  semi_axes: np.ndarray     # (3,)
  landmarks: np.ndarray     # (21, 3) head-frame points
  normals: np.ndarray       # (21, 3) unit outward surface normals


def make_head(width: float = 0.92, height: float = 1.2,
              depth: float = 0.95) -> Head:
  """Returns a head whose template landmarks lie on its ellipsoid."""
  semi_axes = np.array([width, height, depth])
  xy = _TEMPLATE_XY * np.array([width / 0.92, height / 1.2])
  inside = 1.0 - (xy[:, 0] / width) ** 2 - (xy[:, 1] / height) ** 2
  z = depth * np.sqrt(np.maximum(inside, 0.0))
  points = np.column_stack([xy, z])
  normals = points / semi_axes ** 2
  normals /= np.linalg.norm(normals, axis=1, keepdims=True)
  # The nose tip sticks out of the surface along the normal of its base.
  points[NOSE_TIP] += NOSE_TIP_PROTRUSION * normals[NOSE_TIP]
  return Head(semi_axes, points, normals)


def rotation_matrix(pose: np.ndarray) -> np.ndarray:
  """Returns R = Rz(roll) Rx(pitch) Ry(yaw) for pose (roll, pitch, yaw)."""
  roll, pitch, yaw = pose
  cr, sr = np.cos(roll), np.sin(roll)
  cp, sp = np.cos(pitch), np.sin(pitch)
  cy, sy = np.cos(yaw), np.sin(yaw)
  rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
  rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  return rz @ rx @ ry


class PosedHead(NamedTuple):
  """A head placed in an image: pixel (u, v) = centre + scale * (x, -y)."""
  head: Head
  rotation: np.ndarray      # (3, 3) head frame -> camera frame
  center: np.ndarray        # (2,) pixel position of the head centre
  scale: float              # pixels per head unit

  def pixel_to_camera(self, u: np.ndarray, v: np.ndarray):
    """Maps pixel coordinates to camera-frame (x, y) in head units."""
    return (u - self.center[0]) / self.scale, (self.center[1] - v) / self.scale

  def ellipsoid_matrix(self) -> np.ndarray:
    """M with x^T M x = 1 on the head surface, x in camera coordinates."""
    inverse_squares = np.diag(1.0 / self.head.semi_axes ** 2)
    return self.rotation @ inverse_squares @ self.rotation.T


def project_landmarks(posed: PosedHead,
                      image_size: tuple[int, int]) -> tuple[np.ndarray,
                                                            np.ndarray]:
  """Projects the landmarks; returns pixel (21, 2) (x, y) and visibility.

  A point is visible iff its surface normal faces the camera (self-occlusion)
  and it falls inside the image (height, width) = image_size.
  """
  camera_points = posed.head.landmarks @ posed.rotation.T
  pixels = np.column_stack([
      posed.center[0] + posed.scale * camera_points[:, 0],
      posed.center[1] - posed.scale * camera_points[:, 1],
  ])
  facing_camera = (posed.head.normals @ posed.rotation.T)[:, 2] > 0.0
  height, width = image_size
  inside = ((pixels[:, 0] >= 0) & (pixels[:, 0] < width)
            & (pixels[:, 1] >= 0) & (pixels[:, 1] < height))
  return pixels.astype(np.float32), (facing_camera & inside).astype(np.float32)


def silhouette_box(posed: PosedHead) -> np.ndarray:
  """Returns the tight pixel [x, y, w, h] box of the head's outline.

  The orthographic outline of the ellipsoid x^T M x = 1 is the ellipse
  p^T Q p = 1 with Q the Schur complement of M_zz; its half extents are
  sqrt(diag(Q^-1)).
  """
  m = posed.ellipsoid_matrix()
  q = m[:2, :2] - np.outer(m[:2, 2], m[2, :2]) / m[2, 2]
  half_extent = posed.scale * np.sqrt(np.diag(np.linalg.inv(q)))
  top_left = posed.center - half_extent
  return np.concatenate([top_left, 2 * half_extent]).astype(np.float32)
