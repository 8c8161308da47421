"""Pausing Python's cyclic garbage collector while a checkpoint's items are read or written.

Reading or writing thousands of items allocates objects at a rate that sets off
full collections, each walking every object of the process (0.1 s and more in
a training process), several times per checkpoint. None of those objects form
cycles, so nothing is lost by collecting once afterwards instead.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Automatic collection off inside (nested or in several threads at once), as it was outside."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
