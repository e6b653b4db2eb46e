"""Content-addressed store: each stage's output is a file named by a hash of everything that made it.

A file appears under its final name only when it is complete (written to a temporary name in the
same folder, flushed, its digest recorded, then renamed), so a crash at any point leaves either nothing
or a whole file; `check` finds a file damaged since (`t2v.digests`). Published clips are copies, never
links into the store: a user replacing a delivered file cannot change what the store holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import torch
from safetensors.torch import load_file, save_file

from t2v.digests import Digests, Verdict, file_digest

_TEMP_MARK = ".partial-"


class Kind(Protocol):
    """What the store needs of a stage (`t2v.pipeline.Stage`): its folder and its files' suffix."""

    @property
    def folder(self) -> str: ...

    suffix: str


@dataclass(frozen=True)
class Folder:
    """Files the store keeps that are no stage's output (a diffusion's checkpoints)."""

    folder: str
    suffix: str


def make_key(name: str, **parts: object) -> str:
    """Hash of a stage's store name and its key parts (JSON-able values, other keys among them)."""
    blob = json.dumps({"stage": name, **parts}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Store:
    """Files under `root/<stage folder>/<key[:2]>/<key><suffix>`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.digests = Digests(self.root / "quarantine")
        self.on_written: Callable[[Kind, Path], None] | None = None
        """Called with (stage, temporary path) once a file is written and before it is renamed into
        place; the runner's crash drill (T2V_PAUSE_AT) waits there to be killed."""

    def path(self, stage: Kind, key: str) -> Path:
        return self.root / stage.folder / key[:2] / f"{key}{stage.suffix}"

    def has(self, stage: Kind, key: str) -> bool:
        """Whether the file is there (unchecked: see `check` before using or skipping it)."""
        return self.path(stage, key).is_file()

    def check(self, stage: Kind, key: str) -> tuple[Verdict, str]:
        """Whether the output is stored and whole; a damaged one is moved to `<root>/quarantine`, so
        that its stage computes it again. Returns the verdict and, when damaged, what happened."""
        return self.digests.check(self.path(stage, key))

    @contextmanager
    def writing(self, stage: Kind, key: str) -> Iterator[Path]:
        """Yield a temporary path to write; it becomes the stored file only if the block succeeds."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # The thread too: a process writes several outputs at once (frames while the next job decodes).
        temp = final.with_name(f"{_TEMP_MARK}{os.getpid()}-{threading.get_ident()}-{final.name}")
        try:
            yield temp
            if self.on_written is not None:
                self.on_written(stage, temp)
            _fsync(temp)
            self.digests.record(temp, final)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)

    def remove(self, stage: Kind, key: str) -> None:
        """Delete a stored file and its digest (a checkpoint whose result is stored)."""
        path = self.path(stage, key)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)

    def save_tensors(self, stage: Kind, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        with self.writing(stage, key) as temp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temp))
        return self.path(stage, key)

    def load_tensors(self, stage: Kind, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(stage, key)))

    def sweep_partials(self) -> int:
        """Delete temporary files left by a killed process; returns how many.

        Files that a live process is still writing (a `generate` beside the nightly run) are kept.
        """
        count = 0
        if self.root.is_dir():
            for temp in self.root.rglob(f"{_TEMP_MARK}*"):
                if _writer_alive(temp):
                    continue
                temp.unlink(missing_ok=True)
                count += 1
        return count


def sweep_partials(folder: Path) -> int:
    """`Store.sweep_partials` for any folder (the published clips): temporary files of dead writers."""
    return Store(folder).sweep_partials()


def publish(source: Path, dest: Path) -> Path:
    """Put a stored clip at a user-facing path atomically, as a file of its own (a reflink where the
    filesystem has them, else a copy); a file already there with the same bytes is left as it is."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _same_bytes(source, dest):
        return dest
    temp = dest.with_name(f"{_TEMP_MARK}{os.getpid()}-{dest.name}")
    try:
        _clone(source, temp)
        _fsync(temp)
        os.replace(temp, dest)
    finally:
        temp.unlink(missing_ok=True)
    return dest


def _same_bytes(source: Path, dest: Path) -> bool:
    try:
        if dest.stat().st_size != source.stat().st_size:
            return False
    except FileNotFoundError:
        return False
    return file_digest(dest) == file_digest(source)


_FICLONE = 0x40049409
"""Linux ioctl: make `dest` share `source`'s blocks copy-on-write (btrfs, XFS): instant, and a later
write to either file leaves the other as it was."""


def _clone(source: Path, dest: Path) -> None:
    import fcntl

    with open(source, "rb") as src, open(dest, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass  # no reflinks here (ext4, tmpfs, another filesystem): copy the bytes
        shutil.copyfileobj(src, dst, 8 * 2**20)


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in a temporary file's name may still be writing it."""
    pid = temp.name[len(_TEMP_MARK) :].split("-", 1)[0]
    # pid_exists, not Process(): on Linux a thread's id names it too, and ids wrap at 32768 in a
    # container, so a dead writer's pid can come back as some process's thread within one night.
    if not pid.isdigit() or not psutil.pid_exists(int(pid)):
        return False
    try:
        started = psutil.Process(int(pid)).create_time()
        stat = temp.stat()
    except (psutil.NoSuchProcess, FileNotFoundError):
        return False
    except psutil.Error:
        return True  # exists but cannot be inspected: leave its file alone
    written = stat.st_mtime
    # A process cannot have written a file before it started: an older file is from an earlier
    # process that had the same pid (containers reuse low pids every night).
    return written + 1.0 >= started


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
