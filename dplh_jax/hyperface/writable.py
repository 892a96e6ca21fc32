"""Proving a folder writable before a run depends on it."""

from __future__ import annotations

import os
import tempfile


def check_writable_folder(path: str, what: str,
                          fix: str = 'pass a folder you can write to') -> None:
  """Creates ``path`` if needed and writes a file in it, so a bad folder
  fails in one line before any work, not at the first save.

  Args:
    path: the folder.
    what: how the message names it, e.g. ``'workdir'``.
    fix: what the message tells the user to do.

  Raises:
    ValueError: ``path`` is a file, or cannot be created or written to.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{what} {path} is a file, not a folder: {fix}.')
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise ValueError(
        f'{what} {path} is not writable ({error.strerror}): {fix}.') from error
