"""The stage registry: the pipeline's stages in order, each defined once in its own module.

Everything that needs to know about stages (the store, the run log's readers, the runner, the tasks,
the flows, the dashboard) asks here. A new stage is one module with its `STAGE` and one entry below.
"""

from __future__ import annotations

from collections.abc import Sequence

from t2v.errors import InvalidInput
from t2v.pipeline import decode, diffuse, encode, finish
from t2v.pipeline.stage import JobKeys, KeyInputs, Stage, Work
from t2v.store import make_key

PIPELINE: tuple[Stage, ...] = (encode.STAGE, diffuse.STAGE, decode.STAGE, finish.STAGE)
"""In the order a job goes through them; a stage's inputs come before it."""

FINAL = PIPELINE[-1]
"""Its output is the job's clip."""


def stage_named(name: str, pipeline: Sequence[Stage] = PIPELINE) -> Stage:
    """The stage called `name` (or formerly so); raises InvalidInput naming the ones there are."""
    for stage in pipeline:
        if name == stage.name or name in stage.formerly:
            return stage
    raise InvalidInput(f"no stage {name!r}; the stages are {', '.join(s.name for s in pipeline)}.")


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

__all__ = ["FINAL", "PIPELINE", "JobKeys", "KeyInputs", "Stage", "Work", "check_pipeline", "make_key", "stage_named"]
