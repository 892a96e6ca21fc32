"""Per-group (per-layer) clip norms: which parameters form a group, and each
group's norm ``C_g``.

With per-group clipping, example ``i``'s gradient restricted to group ``g``
is clipped to ``C_g`` by its own norm over that group, so its whole clipped
gradient has L2 norm at most::

    C_total = sqrt(sum_g C_g**2)

and adding or removing one example moves the clipped sum by at most
``C_total``: that is the L2 sensitivity the noise is calibrated to (noise
``N(0, (sigma * C_total)**2 I)`` once on the whole sum, the same in every
coordinate). ``C_total`` is computed here in float64 from the Python floats.

A :class:`GroupClipNorms` is given wherever a clip norm is
(``dp_transform.dp_aggregate``, ``dp_transform.clip_and_sum``, both
``clipped_grad_sum``); every parameter must be in exactly one group, and every
group must hold a parameter (an empty group would still count in
``C_total``). Pass the same object to the transform and to the clipping;
the transform compares the resolved grouping, :class:`GroupAssignment`,
which a ``ClippedSum`` carries.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping

import jax

from dplh_jax.dp import clip_norms

PyTree = Any
Path = tuple[str, ...]


def path_of(key_path: tuple[Any, ...]) -> Path:
  """A JAX key path as a tuple of strings (dict keys, attribute names,
  sequence indices), the form Flax's ``flatten_dict`` keys have."""
  parts = []
  for entry in key_path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry))
  return tuple(parts)


def leaf_paths(tree: PyTree) -> list[Path]:
  """The paths of ``tree``'s leaves, in ``jax.tree.leaves`` order."""
  return [path_of(key_path) for key_path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclasses.dataclass(frozen=True)
class GroupAssignment:
  """A grouping resolved on one parameter tree; hashable and compared by
  value, so a ``ClippedSum`` can carry it as static metadata.

  Attributes:
    norms: ``(group, C_g)`` pairs, in the order of the specification.
    leaves: ``(('a', 'b', 'kernel'), group)`` per parameter, sorted by
      path; paths stay tuples, since joined with '/' ``{'a/b': {'c': ..}}``
      and ``{'a': {'b/c': ..}}`` would compare equal.
  """
  norms: tuple[tuple[str, float], ...]
  leaves: tuple[tuple[Path, str], ...]

  @property
  def total_l2_norm_clip(self) -> float:
    return total_l2_norm_clip(c for _, c in self.norms)


def total_l2_norm_clip(norms) -> float:
  """``sqrt(sum_g C_g**2)`` in float64 (``math.fsum``: correctly rounded
  sum), checked to lie in the clip norm's range."""
  total = math.sqrt(math.fsum(c * c for c in norms))
  return clip_norms.check_l2_norm_clip(total, 'sqrt(sum_g C_g**2)')


@dataclasses.dataclass(frozen=True)
class GroupClipNorms:
  """Clip norms per group of parameters. Build with :meth:`from_tree` or
  :meth:`from_function`.

  Attributes:
    norms: ``(group, C_g)`` pairs.
    prefixes: for :meth:`from_tree`, the path of each group (a prefix of its
      parameters' paths); None otherwise.
    group_of: for :meth:`from_function`, ``path -> group``; None otherwise.
  """
  norms: tuple[tuple[str, float], ...]
  prefixes: tuple[Path, ...] | None = None
  group_of: Callable[[Path], str] | None = None

  def __post_init__(self):
    if (self.prefixes is None) == (self.group_of is None):
      raise ValueError('Give exactly one of prefixes and group_of; build '
                       'with GroupClipNorms.from_tree or from_function.')
    names = [name for name, _ in self.norms]
    if not names or len(set(names)) != len(names):
      raise ValueError(f'Clip groups need distinct names, got {names}.')
    for name, value in self.norms:
      _norm(name, value)
    if self.prefixes is not None:
      if len(self.prefixes) != len(names):
        raise ValueError('One prefix per group is needed.')
      for a in self.prefixes:
        for b in self.prefixes:
          if a != b and b[:len(a)] == a:
            raise ValueError(f'Group {_name(a)} contains group {_name(b)}; '
                             'a parameter must be in one group.')

  @classmethod
  def from_tree(cls, norms_tree: PyTree) -> GroupClipNorms:
    """A pytree of clip norms matching a prefix of the parameters: every
    parameter under a leaf of ``norms_tree`` is in that leaf's group, named
    by its path (``'params/Dense_0'``).

    >>> clip = GroupClipNorms.from_tree(
    ...     {'params': {'Conv_0': 1.0, 'Dense_0': 0.5}})
    >>> round(clip.total_l2_norm_clip, 6)
    1.118034
    """
    flat = jax.tree_util.tree_flatten_with_path(norms_tree)[0]
    prefixes = tuple(path_of(key_path) for key_path, _ in flat)
    norms = tuple((_name(path), _norm(_name(path), value))
                  for path, (_, value) in zip(prefixes, flat))
    return cls(norms=norms, prefixes=prefixes)

  @classmethod
  def from_function(cls, group_of: Callable[[Path], str],
                    norms: Mapping[str, float]) -> GroupClipNorms:
    """``group_of(path)`` names each parameter's group, a string key of
    ``norms``; ``path`` is a tuple of strings such as
    ``('params', 'Dense_0', 'bias')``.

    >>> clip = GroupClipNorms.from_function(
    ...     lambda path: path[-1], {'kernel': 3.0, 'bias': 4.0})
    >>> clip.total_l2_norm_clip
    5.0
    """
    if not callable(group_of):
      raise TypeError(f'group_of must map a parameter path to a group name, '
                      f'got {group_of!r}.')
    for name in norms:
      if not isinstance(name, str):
        raise TypeError(f'Clip group names must be strings, got {name!r}; '
                        'name the groups (and return the names from '
                        'group_of) as strings.')
    return cls(norms=tuple((name, _norm(name, value))
                           for name, value in norms.items()),
               group_of=group_of)

  @property
  def total_l2_norm_clip(self) -> float:
    """``sqrt(sum_g C_g**2)``: the L2 sensitivity of the clipped sum."""
    return total_l2_norm_clip(c for _, c in self.norms)

  def group_index(self, path: Path) -> int:
    """The index in :attr:`norms` of the group of the parameter at ``path``."""
    names = [name for name, _ in self.norms]
    if self.prefixes is not None:
      matches = [g for g, prefix in enumerate(self.prefixes)
                 if path[:len(prefix)] == prefix]
      if not matches:
        raise ValueError(f'Parameter {"/".join(path)} is under no leaf of the '
                         'clip norm tree; give every parameter a group.')
      return matches[0]  # prefixes never nest: at most one matches
    name = self.group_of(path)
    if not isinstance(name, str):
      raise TypeError(f'group_of maps parameter {"/".join(path)} to '
                      f'{name!r}, not a string; return one of {names}.')
    if name not in names:
      raise ValueError(f'group_of maps parameter {"/".join(path)} to group '
                       f'{name!r}, which has no clip norm; known groups: '
                       f'{names}.')
    return names.index(name)

  def assign(self, tree: PyTree) -> tuple[list[int], GroupAssignment]:
    """Groups of ``tree``'s leaves (``jax.tree.leaves`` order) and the
    resolved grouping; raises if a group holds no leaf."""
    paths = leaf_paths(tree)
    groups = [self.group_index(path) for path in paths]
    empty = [name for g, (name, _) in enumerate(self.norms)
             if g not in groups]
    if empty:
      raise ValueError(f'Clip groups {empty} hold no parameter but would '
                       'count in the sensitivity; remove them.')
    assignment = GroupAssignment(self.norms, tuple(sorted(
        (path, self.norms[g][0]) for path, g in zip(paths, groups))))
    return groups, assignment


def _name(path: Path) -> str:
  return '/'.join(path) if path else '<all>'


def _norm(name: str, value: Any) -> float:
  if not isinstance(value, numbers.Real):
    raise TypeError(f'The clip norm of group {name!r} must be a Python '
                    f'number, got {value!r}.')
  return clip_norms.check_l2_norm_clip(value, f'clip norm of group {name!r}')
