"""What a run lets others watch and change without patching library functions: events with times
(card waits and holds, component loads, computes, writes), how far a compute is (its steps, for the
live night view), checks before a compute (the OOM drill), a callback once a stored file is written
(the pause drill), the video codec and the component loader.

Benchmarks build their timelines from the events; tests and drills hand in their checks.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from t2v.jobs import JobSpec
    from t2v.models.registry import ModelRef
    from t2v.pipeline import Stage
    from t2v.plans import StagePlan

SPANS = ("card-wait", "card", "load", "place", "compute", "write")
"""What an event's span may be: waiting for the card, holding it, loading a component onto the host,
placing it on the card, a stage's compute (placing included), writing its output."""


@dataclass(frozen=True)
class Event:
    """One end of a span of a stage's work."""

    span: str
    """One of `SPANS`."""
    phase: str
    """"start" or "end"."""
    stage: str
    template: str | None
    plan: str | None
    t: float
    """time.perf_counter() when it happened."""
    thread: str = ""


Loader = Callable[["ModelRef", str], "torch.nn.Module"]


def _default_codec() -> Any:
    from t2v.media import FFMPEG

    return FFMPEG


def _default_loader() -> Loader:
    from t2v.models.registry import load_component

    return load_component


@dataclass(frozen=True)
class Hooks:
    """Everything a runner calls out to; empty tuples where nobody listens."""

    on_event: tuple[Callable[[Event], None], ...] = ()
    before_compute: tuple[Callable[[Stage, StagePlan | None, JobSpec], None], ...] = ()
    """Called on the card, before each attempt computes; may raise (torch.OutOfMemoryError, to drill
    the fallback)."""
    on_written: tuple[Callable[[Stage, Path], None], ...] = ()
    """Called with a stored file's temporary path before it is renamed into place."""
    on_step: tuple[Callable[[Stage, JobSpec, int], None], ...] = ()
    """Called after each denoising step (and its checkpoint, if one was due) with the steps done."""
    on_progress: tuple[Callable[[Stage, JobSpec, int, int | None], None], ...] = ()
    """Called as a compute advances, with its steps done and how many there are (None: not counted):
    the encode's texts, the diffusion's steps, the decoder's passes (a latent frame, or one tile of
    one). Called on the compute's thread, between its kernels: a listener must only note the value."""
    codec: Any = field(default_factory=_default_codec)
    """Writes lossless frames and encodes clips (`t2v.media.Codec`)."""
    load: Loader = field(default_factory=_default_loader)
    """Loads a model component onto the host (`t2v.models.registry.load_component`)."""

    def __add__(self, other: Hooks) -> Hooks:
        """Both sets of listeners; `other`'s codec and loader where they are not the defaults."""
        default = Hooks()
        return replace(
            self,
            on_event=self.on_event + other.on_event,
            before_compute=self.before_compute + other.before_compute,
            on_written=self.on_written + other.on_written,
            on_step=self.on_step + other.on_step,
            on_progress=self.on_progress + other.on_progress,
            codec=other.codec if other.codec is not default.codec else self.codec,
            load=other.load if other.load is not default.load else self.load,
        )

    def emit(self, span: str, phase: str, stage: Stage, job: JobSpec | None, plan: StagePlan | None) -> None:
        if not self.on_event:
            return
        event = Event(
            span=span,
            phase=phase,
            stage=stage.name,
            template=job.template if job is not None else None,
            plan=plan.name if plan is not None else None,
            t=time.perf_counter(),
            thread=threading.current_thread().name,
        )
        for listener in self.on_event:
            listener(event)

    def progress(self, stage: Stage, job: JobSpec, done: int, total: int | None) -> None:
        """Tell the `on_progress` listeners that `stage` of `job` has done `done` of `total` steps."""
        for listener in self.on_progress:
            listener(stage, job, done, total)

    @contextmanager
    def span(
        self, span: str, stage: Stage, job: JobSpec | None = None, plan: StagePlan | None = None
    ) -> Iterator[None]:
        self.emit(span, "start", stage, job, plan)
        try:
            yield
        finally:
            self.emit(span, "end", stage, job, plan)


def hooks_from(spec: str) -> Hooks:
    """`module:function` returning Hooks ($T2V_HOOKS), for runs in processes a test or benchmark does
    not start itself (Prefect workers); empty for none."""
    if not spec:
        return Hooks()
    module, _, name = spec.partition(":")
    made = getattr(importlib.import_module(module), name)()
    if not isinstance(made, Hooks):
        raise TypeError(f"T2V_HOOKS={spec!r} returned {type(made).__name__}, not t2v.engine.Hooks")
    return made
