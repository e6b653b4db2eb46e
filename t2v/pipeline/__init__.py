"""The stage registry: the pipeline's stages in order, each defined once in its own module.

Everything that needs to know about stages (the store, the run log's readers, the runner, the tasks,
the flows, the dashboard) asks here. A new stage is one module with its `STAGE` and one entry in
`PIPELINE`; `register` adds one at run time (a plug-in, a test) without editing this file.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from t2v.errors import InvalidInput
from t2v.pipeline import decode, diffuse, encode, finish
from t2v.pipeline.stage import JobKeys, KeyInputs, Stage, Work
from t2v.store import make_key

PIPELINE: tuple[Stage, ...] = (encode.STAGE, diffuse.STAGE, decode.STAGE, finish.STAGE)
"""The built-in stages, in the order a job goes through them; a stage's inputs come before it."""

CLIP = finish.STAGE
"""The stage whose output is the job's published clip."""


def check_pipeline(pipeline: Sequence[Stage]) -> None:
    """Names unique and every stage's inputs earlier in the order: what `JobKeys.of` relies on."""
    seen: set[str] = set()
    for stage in pipeline:
        if stage.name in seen:
            raise ValueError(f"two stages are called {stage.name!r}")
        missing = [s.name for s in stage.inputs if s.name not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which do not come before it")
        seen.add(stage.name)


check_pipeline(PIPELINE)
_stages: list[Stage] = list(PIPELINE)
_lock = threading.Lock()


def stages() -> tuple[Stage, ...]:
    """The stages a run goes through now: the built-in ones and any registered, in order."""
    with _lock:
        return tuple(_stages)


def register(stage: Stage, *, before: Stage) -> None:
    """Add `stage` to the pipeline just before `before` (its inputs must come earlier)."""
    with _lock:
        at = _stages.index(before)
        candidate = [*_stages[:at], stage, *_stages[at:]]
        check_pipeline(candidate)
        _stages[:] = candidate


def unregister(stage: Stage) -> None:
    with _lock:
        if stage in PIPELINE:
            raise ValueError(f"{stage.name!r} is a built-in stage")
        _stages.remove(stage)


def stage_named(name: str) -> Stage:
    """The stage called `name` (or formerly so); raises InvalidInput naming the ones there are."""
    found = stages()
    for stage in found:
        if name == stage.name or name in stage.formerly:
            return stage
    raise InvalidInput(f"no stage {name!r}; the stages are {', '.join(s.name for s in found)}.")


__all__ = [
    "CLIP",
    "PIPELINE",
    "JobKeys",
    "KeyInputs",
    "Stage",
    "Work",
    "check_pipeline",
    "make_key",
    "register",
    "stage_named",
    "stages",
    "unregister",
]
