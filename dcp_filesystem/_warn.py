"""Warnings that point at the user's line, not at DCP's or this package's frames in between."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Tuple, Type

import torch.distributed


def _skipped_prefixes() -> Tuple[str, ...]:
    return (
        os.path.dirname(os.path.abspath(__file__)) + os.sep,  # this package, whatever it is vendored as
        os.path.dirname(os.path.abspath(torch.distributed.__file__)) + os.sep,  # dcp.save, its loggers, planners
        os.path.abspath(contextlib.__file__),  # the decorators on our methods
    )


def warn_at_caller(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package, torch.distributed and contextlib:
    the line that called ``dcp.save`` (or the writer method directly)."""
    skipped = _skipped_prefixes()
    frame = sys._getframe(1)
    level = 2  # 1 would be this function's own line
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
