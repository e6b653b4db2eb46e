"""Fault drills, as hooks a runner is handed: out-of-memory injected before a compute
($T2V_INJECT_OOM), and a pause where crash tests kill the process ($T2V_PAUSE_AT): with a stage's
first output written but not yet renamed into place (`diffuse`), or after a denoising step and its
checkpoint (`diffuse@3`)."""

from __future__ import annotations

import fnmatch
import logging
import time
from pathlib import Path

import torch

from t2v.engine.hooks import Hooks
from t2v.jobs import JobSpec
from t2v.pipeline import Stage, stage_named
from t2v.plans import StagePlan
from t2v.settings import PAUSE_SECONDS, Settings

log = logging.getLogger("t2v")


class Drills:
    """The drills one run's settings ask for; `hooks()` hands them to the runner."""

    def __init__(self, settings: Settings) -> None:
        self.inject_oom = [p.strip() for p in settings.inject_oom.split(",") if p.strip()]
        self._raw_oom = settings.inject_oom
        name, _, step = settings.pause_at.partition("@")
        self.pause_at = stage_named(name) if name else None
        self.pause_step = int(step) if step else None
        self.marker_dir = settings.data_dir
        self._paused = False

    def hooks(self) -> Hooks:
        pausing = self.pause_at is not None
        return Hooks(
            before_compute=(self.maybe_inject_oom,) if self.inject_oom else (),
            on_written=(self.maybe_pause,) if pausing and self.pause_step is None else (),
            on_step=(self.maybe_pause_at_step,) if pausing and self.pause_step is not None else (),
        )

    def maybe_pause_at_step(self, stage: Stage, job: JobSpec, done: int) -> None:
        if stage == self.pause_at and done == self.pause_step and not self._paused:
            self._pause(f"{stage.name}@{done}", f"{job.template} after step {done}")

    def maybe_inject_oom(self, stage: Stage, plan: StagePlan | None, job: JobSpec) -> None:
        if plan is None:
            return
        for pattern in self.inject_oom:
            # `template/stage:plan` aims at one job; plain `stage:plan` at every job with that plan.
            target = f"{job.template}/{plan.name}" if "/" in pattern else plan.name
            if fnmatch.fnmatch(target, pattern):
                raise torch.OutOfMemoryError(f"injected by T2V_INJECT_OOM={self._raw_oom!r}")

    def maybe_pause(self, stage: Stage, temp: Path) -> None:
        """Stop once, with the stage's first output complete but not yet renamed.

        This is the moment a crash hurts most (the row says "running", the bytes exist under a
        temporary name), so crash tests kill the process here: see tests/test_crash.py.
        """
        if stage != self.pause_at or self._paused:
            return
        self._pause(stage.name, f"before publishing {temp}")

    def _pause(self, name: str, where: str) -> None:
        self._paused = True
        marker = self.marker_dir / f"paused-at-{name}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{where}\n")
        log.warning("T2V_PAUSE_AT=%s: paused %s; waiting to be killed", name, where)
        time.sleep(PAUSE_SECONDS)
