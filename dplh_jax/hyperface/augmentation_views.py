"""Augmentation multiplicity: M augmented views of an image in ONE example.

De et al. (2022), "Unlocking high-accuracy differentially private image
classification through scale", average the gradients of several augmented
views of an image inside its one per-example gradient. In our unit of
privacy (one image, docs/DESIGN.md, Privacy rules, rule 1) that is: the
image's example holds the K proposal crops of each of its M views,
concatenated along the proposal axis (M*K crops), and its one gradient is the
gradient of the image's loss over all of them (each task loss is a masked
mean over proposals, so the views are averaged). The views are drawn from
the image alone, so they change what one image contributes, never how many
units it is: the clipped sum still moves by at most C when the image is
removed, and the privacy cost is that of M = 1 (only compute grows).

Randomness: view ``v`` of a training image draws its flip, proposal jitter
and proposal selection from ``default_rng(entropy + [v])``, where
``entropy = [seed, TRAIN_STREAM, step, index]``, and view 0 from ``entropy``
itself, so M = 1 is exactly the single-view pipeline. A view depends only on
the image's identity, the step, the seed and the view number, never on the
image's slot or on the other sampled images (rule 8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Example = dict[str, np.ndarray]


def view_entropies(entropy: Sequence[int], views: int) -> list[list[int]]:
  """Seed entropy of each of ``views`` views; view 0 keeps ``entropy``.

  >>> view_entropies([0, 1, 5, 3], 3)
  [[0, 1, 5, 3], [0, 1, 5, 3, 1], [0, 1, 5, 3, 2]]
  """
  if views < 1:
    raise ValueError(f'views={views} must be >= 1 (1: one view, no '
                     'multiplicity).')
  return [list(entropy)] + [[*entropy, view] for view in range(1, views)]


def concatenate_views(views: Sequence[Example]) -> Example:
  """One example from views of one image: per-proposal arrays concatenated.

  Arrays with a leading proposal axis (crops and every per-proposal target)
  are joined along it; per-image scalars (``has_*`` flags, ``image_index``)
  must agree across the views and are kept once. One view is returned as is.

  Raises:
    ValueError: if the views disagree on a per-image value (they must come
      from one image).
  """
  if len(views) == 1:
    return views[0]
  first = views[0]
  example = {}
  for key, value in first.items():
    if np.ndim(value) == 0:
      others = [view[key] for view in views[1:]]
      if any(other != value for other in others):
        raise ValueError(f'{key} differs between the views ({value} vs '
                         f'{others}): views must come from one image.')
      example[key] = value
    else:
      example[key] = np.concatenate([view[key] for view in views])
  return example


def multi_view_example(make_view: Callable[[np.random.Generator], Example],
                       entropy: Sequence[int], views: int) -> Example:
  """The example of ``views`` views of one image.

  Args:
    make_view: builds one view (K proposals) of the image from a generator.
    entropy: the image's seed entropy (``[seed, TRAIN_STREAM, step,
      index]``): view ``v`` uses :func:`view_entropies`'s ``v``-th entry.
    views: M >= 1.

  Returns:
    The image's example with M*K proposals (:func:`concatenate_views`).
  """
  return concatenate_views([make_view(np.random.default_rng(view_entropy))
                            for view_entropy in view_entropies(entropy,
                                                               views)])
