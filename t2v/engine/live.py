"""Watching a night as it runs: each job's step per stage, and the card's and the host's memory every
second, written to the run log (`t2v.runlog.live`) by one daemon thread per night.

Nothing here runs on the card's path. A compute reports its steps through `Hooks.on_progress`, and the
listener only puts the value into a latest-value slot (a dict under an uncontended lock, well under a
microsecond). The recorder's thread samples memory once a second (and at every compute's start and end,
so that a stage shorter than a second still has samples of its own), and once a second writes the
progress that changed, the samples taken and a heartbeat in one short transaction. A run log that is
briefly locked or gone costs a warning: what was not written is written with the next beat.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psutil

from t2v.engine.hooks import Event, Hooks
from t2v.hostmem import GIB, cgroup_usage, own_cgroups
from t2v.runlog.live import CHUNK_SAMPLES, ProgressKey, ProgressValue, Sample, pack
from t2v.vram import open_nvml

if TYPE_CHECKING:
    from t2v.jobs import JobSpec
    from t2v.pipeline import Stage
    from t2v.runlog import RunLog

log = logging.getLogger("t2v")

SAMPLE_S = 1.0
"""Seconds between two memory samples, and between two writes to the run log."""
JOIN_S = 5.0
"""Seconds the end of a night waits for the recorder's last write."""


class ProgressSlot:
    """The latest (step, steps) of each (template, stage): noted by the computes' threads, taken by the
    recorder's. Only the newest value of a key is kept, so a diffusion of 40 steps a second costs the
    run log one row update a second, not 40."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[ProgressKey, ProgressValue] = {}

    def note(self, template: str, stage: str, step: int, steps: int | None) -> None:
        with self._lock:
            self._latest[(template, stage)] = (step, steps)

    def take(self) -> dict[ProgressKey, ProgressValue]:
        """What was noted since the last take; the slot is empty after."""
        with self._lock:
            taken, self._latest = self._latest, {}
        return taken

    def put_back(self, taken: dict[ProgressKey, ProgressValue]) -> None:
        """Values a failed write did not store, unless a newer one was noted meanwhile."""
        with self._lock:
            for key, value in taken.items():
                self._latest.setdefault(key, value)


class MemoryProbe:
    """Memory now, in GiB: NVML's used memory of the card and PyTorch's reserved on it (None on the
    CPU, or before this process has a CUDA context), this process's RSS and its memory cgroup's usage
    (None outside one)."""

    def __init__(self, device: str) -> None:
        self._process = psutil.Process()
        self._cgroups = own_cgroups()[:1]
        self._index: int | None = None
        self._nvml: Any = None
        self._handle: Any = None
        if device.startswith("cuda"):
            self._index = int(device.partition(":")[2] or 0)
            opened = open_nvml(self._index)
            if opened is not None:
                self._nvml, self._handle = opened

    def read(self) -> tuple[float | None, float | None, float | None, float | None]:
        """(nvml_gib, reserved_gib, rss_gib, cgroup_gib)."""
        nvml = reserved = rss = None
        if self._nvml is not None:
            try:
                nvml = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used) / GIB
            except self._nvml.NVMLError:
                pass
        # Only a CUDA context this process already has is read: the sampler must never make one (it
        # costs some hundred MiB of the card being measured).
        torch = sys.modules.get("torch")
        if self._index is not None and torch is not None and torch.cuda.is_initialized():
            reserved = torch.cuda.memory_reserved(self._index) / GIB
        try:
            rss = self._process.memory_info().rss / GIB
        except psutil.Error:
            pass
        used = cgroup_usage(self._cgroups) if self._cgroups else None
        return nvml, reserved, rss, None if used is None else used / GIB

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = self._handle = None


class LiveRecorder:
    """One run's live record: `hooks()` for the runner, and, while entered (`with recorder:`), the
    thread that samples memory and writes progress, samples and heartbeat every `interval_s`."""

    def __init__(
        self,
        runlog: RunLog,
        run_id: str,
        device: str,
        *,
        interval_s: float = SAMPLE_S,
        probe: Callable[[], MemoryProbe] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, not {interval_s}")
        self.runlog, self.run_id, self.interval_s = runlog, run_id, interval_s
        self.slot = ProgressSlot()
        self._make_probe = probe or (lambda: MemoryProbe(device))
        self._clock = clock
        self._started = 0.0
        self._buffer: list[Sample] = []
        """Samples of the chunks not yet written whole, from chunk `_seq` on."""
        self._seq = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._entered = 0
        self._entry_lock = threading.Lock()
        self._failing = False
        self.writes = 0
        """Successful writes so far (tests and the overhead benchmark read it)."""
        self.cpu_s = 0.0
        """CPU seconds the thread used, once it has ended (bench/live_overhead.py reports it)."""

    def hooks(self) -> Hooks:
        """The listeners a runner adds to its hooks: progress into the slot, compute boundaries as a
        nudge to sample. Inert until the recorder is entered: the slot only holds the latest values."""
        return Hooks(on_progress=(self._progress,), on_event=(self._event,))

    def _progress(self, stage: Stage, job: JobSpec, done: int, total: int | None) -> None:
        self.slot.note(job.template, stage.name, done, total)

    def _event(self, event: Event) -> None:
        if event.span != "compute":
            return
        if event.phase == "start" and event.template is not None:
            # Every stage shows as started, also one that counts no steps (finish) or not yet.
            self.slot.note(event.template, event.stage, 0, None)
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------------

    def __enter__(self) -> LiveRecorder:
        with self._entry_lock:
            self._entered += 1
            if self._entered > 1:
                return self  # one thread per run, however many callers watch it
            self._started = self._run_started()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="t2v-live", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._entry_lock:
            self._entered -= 1
            if self._entered > 0 or self._thread is None:
                return
            self._stop.set()
            self._wake.set()
            # Its last write waits at most this long: a run log locked past it must not hold up the
            # end of a night (or its Ctrl-C); the daemon thread then finishes or dies with the process.
            self._thread.join(timeout=JOIN_S)
            self._thread = None

    def _run_started(self) -> float:
        """When the run's row says it started, as `clock()` counts: samples are timed from there, like
        the stage rows the dashboard marks on them."""
        try:
            return datetime.fromisoformat(self.runlog.run(self.run_id)["started"]).timestamp()
        except Exception as exc:  # the samples are still worth having, timed from now
            log.warning(
                "live record of run %s: cannot read its start (%s); timing from now", self.run_id, exc
            )
            return self._clock()

    def _run(self) -> None:
        cpu = time.thread_time()
        probe = self._make_probe()
        try:
            tick = time.monotonic()
            while not self._stop.is_set():
                self._sample(probe)
                now = time.monotonic()
                if now >= tick:  # a regular beat: write; a sample at a compute boundary only samples
                    self._flush()
                    tick = max(tick + self.interval_s, now + self.interval_s / 2)
                self._wake.wait(timeout=max(tick - time.monotonic(), 0.0))
                self._wake.clear()
            self._sample(probe)  # the night's last figures, with its last progress
            self._flush()
        finally:
            probe.close()
            self.cpu_s = time.thread_time() - cpu

    def _sample(self, probe: MemoryProbe) -> None:
        try:
            figures = probe.read()
        except Exception as exc:  # a probe that fails once must not end the record
            log.debug("live record: memory probe failed: %s", exc)
            figures = (None, None, None, None)
        self._buffer.append((self._clock() - self._started, *figures))

    def _flush(self) -> None:
        progress = self.slot.take()
        chunks = [
            (self._seq + i, pack(self._buffer[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES]))
            for i in range(math.ceil(len(self._buffer) / CHUNK_SAMPLES))
        ]
        try:
            self.runlog.record_live(self.run_id, progress=progress, chunks=chunks)
        except Exception as exc:
            self.slot.put_back(progress)
            if not self._failing:  # once per outage, not once a second
                log.warning(
                    "live record of run %s: cannot write to the run log (%s); retrying", self.run_id, exc
                )
            self._failing = True
            return
        self._failing = False
        self.writes += 1
        full = len(self._buffer) // CHUNK_SAMPLES
        del self._buffer[: full * CHUNK_SAMPLES]
        self._seq += full
