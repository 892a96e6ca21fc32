"""Annotated images of analyzed faces, and figures of several, with Pillow.

Per face: the box, in blue for P(male) > 0.5 and in magenta otherwise, with
``score  M|F  P(male)`` above it; visible landmarks as filled yellow dots,
invisible ones as small red crosses; the head's pose as three axes from the
nose (red: the head's x, to the viewer's right on a frontal face; green:
up; blue: out of the face, towards the viewer at yaw 0), from the rotation
of ``head_model``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from dplh_jax.hyperface import analyzer as analyzer_lib
from dplh_jax.hyperface import face_rect
from dplh_jax.hyperface import proposals

MALE_COLOR, FEMALE_COLOR = (40, 140, 255), (255, 60, 170)
VISIBLE_COLOR, INVISIBLE_COLOR = (255, 230, 0), (255, 40, 40)
AXIS_COLORS = ((255, 50, 50), (60, 230, 60), (70, 110, 255))
NOSE_CENTER = 14


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow without FreeType
    return ImageFont.load_default()


def faces_from_annotations(annotated: proposals.Faces
                           ) -> list[analyzer_lib.Face]:
  """Annotated faces as Faces (score 1, the label as gender probability),
  to draw the ground truth the same way."""
  return [analyzer_lib.Face(
      box=annotated.boxes[i], score=1.0, landmarks=annotated.landmarks[i],
      visibility=annotated.visibility[i],
      visibility_scores=annotated.visibility[i],
      pose=np.nan_to_num(annotated.pose[i]),
      gender_probability=float(annotated.gender[i] == 1))
          for i in range(len(annotated.boxes))]


def draw_faces(image: np.ndarray, faces: Sequence[analyzer_lib.Face],
               scale: int = 3) -> Image.Image:
  """The image enlarged ``scale`` times with every face drawn on it."""
  image = analyzer_lib.as_rgb_uint8(image)
  height, width = image.shape[:2]
  canvas = Image.fromarray(image).resize((width * scale, height * scale),
                                         Image.Resampling.BILINEAR)
  draw = ImageDraw.Draw(canvas)
  font = _font(max(9, 4 * scale))
  dot = max(1.5, 0.6 * scale)
  for face in faces:
    color = MALE_COLOR if face.gender else FEMALE_COLOR
    x, y, w, h = (np.asarray(face.box, np.float64) * scale).tolist()
    draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
    points = np.asarray(face.landmarks, np.float64) * scale
    for (px, py), visible in zip(points, face.visibility):
      if visible > 0.5:
        draw.ellipse([px - dot, py - dot, px + dot, py + dot],
                     fill=VISIBLE_COLOR)
      else:
        draw.line([px - dot, py - dot, px + dot, py + dot],
                  fill=INVISIBLE_COLOR)
        draw.line([px - dot, py + dot, px + dot, py - dot],
                  fill=INVISIBLE_COLOR)
    rotation = face_rect.rotation_matrices(face.pose)[0]
    nose = points[NOSE_CENTER]
    length = 0.4 * h
    for axis, axis_color in enumerate(AXIS_COLORS):
      tip = nose + length * np.array([rotation[0, axis], -rotation[1, axis]])
      draw.line([tuple(nose), tuple(tip)], fill=axis_color, width=2)
    label = (f'{face.score:.2f} {"M" if face.gender else "F"} '
             f'{face.gender_probability:.2f}')
    text_h = font.getbbox(label)[3]
    draw.text((x, max(0, y - text_h - 2)), label, fill=color, font=font)
  return canvas


def figure(rows: Sequence[tuple[str, Sequence[Image.Image]]],
           gap: int = 4) -> Image.Image:
  """Panels in rows, each row under its title; panels of a row side by side."""
  font = _font(16)
  title_h = font.getbbox('Ag')[3] + 6
  panel_w = max(p.width for _, panels in rows for p in panels)
  panel_h = max(p.height for _, panels in rows for p in panels)
  columns = max(len(panels) for _, panels in rows)
  width = columns * panel_w + (columns - 1) * gap
  height = len(rows) * (title_h + panel_h + gap)
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  top = 0
  for title, panels in rows:
    draw.text((2, top + 2), title, fill=(0, 0, 0), font=font)
    for column, panel in enumerate(panels):
      canvas.paste(panel, (column * (panel_w + gap), top + title_h))
    top += title_h + panel_h + gap
  return canvas


def save_png(image: Image.Image, path: str, colors: int | None = None) -> None:
  """Writes a PNG; with ``colors``, palette-quantized (several times
  smaller, for figures meant to be committed)."""
  if colors:
    image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
  image.save(path, format='PNG', optimize=True)
