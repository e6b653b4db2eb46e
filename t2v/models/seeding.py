"""Seeded builds of the built-in models, one at a time in a process.

The builders seed torch's global generator and draw their initial weights from it. A component can be
built in the prefetch thread while a stage builds another (t2v.engine.residency.Residency.prefetch);
interleaved draws would change both models' weights, so every seeded build holds one lock while it draws.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_DRAWING = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator and keep other threads' seeded builds out until the block ends."""
    with _DRAWING:
        torch.manual_seed(seed)
        yield
