"""Runs an iterator ahead in a background thread (batches built meanwhile)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any


def prefetch(iterator: Iterable[Any], buffer_size: int = 2) -> Iterator[Any]:
  """Runs ``iterator`` in a background thread, ``buffer_size`` items ahead.

  NumPy and JPEG decoding release the GIL, so batches are built while the
  train step runs. An exception in the producer is re-raised here.
  """
  items: queue.Queue = queue.Queue(maxsize=buffer_size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        if stop.is_set():
          return
        items.put((True, item))
      items.put((True, done))
    except BaseException as error:  # pylint: disable=broad-except
      items.put((False, error))

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      ok, item = items.get()
      if not ok:
        raise item
      if item is done:
        return
      yield item
  finally:
    stop.set()
    # Unblock a producer waiting on a full queue so the thread can end.
    while thread.is_alive():
      try:
        items.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.01)
