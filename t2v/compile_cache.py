"""Which shapes' compiled transformer blocks Inductor's on-disk cache holds (`Settings.inductor_dir`):
what makes a night's compile cheap, so that a night compiles after far fewer steps."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from t2v.jobs import JobSpec

RECORD = "t2v-compiled.json"
"""Beside Inductor's own files: the shape keys a night compiled there."""

_LOCK = threading.Lock()


def shape_key(job: JobSpec, model_identity: str) -> str:
    """What the compiled blocks depend on: the model, the latents' size and the compiler's version.
    Weights, prompts and seeds do not matter; the card does (Inductor keys on it), so another card
    finds the record but not the kernels, and pays one cold compile."""
    import torch

    return f"{torch.__version__}|{model_identity}|{job.height}x{job.width}x{job.frames}"


class CompiledShapes:
    """The record of compiled shapes in one Inductor cache folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / RECORD

    def keys(self) -> set[str]:
        try:
            return set(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return set()  # none yet, or unreadable: the night counts as cold

    def holds(self, keys: Iterable[str]) -> bool:
        wanted = set(keys)
        return bool(wanted) and wanted <= self.keys()

    def add(self, keys: Iterable[str]) -> None:
        """Record `keys` as compiled (after a compiled diffusion succeeded); atomic, so a reader
        never sees half a file."""
        with _LOCK:
            known = self.keys()
            new = known | set(keys)
            if new == known:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_suffix(f".{os.getpid()}.tmp")
            temp.write_text(json.dumps(sorted(new), indent=0))
            temp.replace(self.path)
