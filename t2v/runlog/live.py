"""A night's live record in the run log: each job's step per stage and the memory timeline.

The recorder (`t2v.engine.live`) writes both once a second in one transaction, with the run's heartbeat.
Progress is one row per (run, template, stage), updated in place; the timeline is packed, a chunk row
of up to `CHUNK_SAMPLES` samples, each sample `SAMPLE_FIELDS` as little-endian float32 with NaN where a
figure was not measured (20 bytes a sample: an eight-hour night is 576 kB in 480 rows). The chunk being
filled is rewritten whole each second (at most 1.2 kB), so a reader always sees every sample so far.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from t2v.runlog.errors import NoSuchRun
from t2v.runlog.schema import Progress, Run, TimelineChunk, check_stage_name

SAMPLE_FIELDS = ("t_s", "nvml_gib", "reserved_gib", "rss_gib", "cgroup_gib")
"""What one sample holds: seconds since the run started, NVML's used memory of the card, what PyTorch's
caching allocator has reserved on it, this process's RSS and its memory cgroup's usage, in GiB."""
CHUNK_SAMPLES = 60
"""Samples per timeline row: a minute at one sample a second."""

Sample = tuple[float, float | None, float | None, float | None, float | None]
ProgressKey = tuple[str, str]
"""(template, stage)."""
ProgressValue = tuple[int, int | None]
"""(step, steps): steps done of how many; None where the stage does not count."""

_PACKED = struct.Struct("<" + "f" * len(SAMPLE_FIELDS))


def pack(samples: Iterable[Sample]) -> bytes:
    """`samples` as the timeline column stores them; None becomes NaN."""
    return b"".join(_PACKED.pack(*(math.nan if v is None else v for v in sample)) for sample in samples)


def unpack(blob: bytes) -> list[Sample]:
    """The samples of one timeline row; NaN comes back as None."""
    return [
        tuple(None if math.isnan(v) else v for v in values)  # type: ignore[misc]
        for values in _PACKED.iter_unpack(blob)
    ]


def write(
    session: Session,
    run_id: str,
    *,
    progress: Mapping[ProgressKey, ProgressValue],
    chunks: Sequence[tuple[int, bytes]],
    now: datetime,
) -> None:
    """The run's heartbeat, its changed progress rows and its changed timeline chunks, in `session`'s
    transaction; NoSuchRun if the run is not in the log."""
    beat = session.execute(update(Run).where(Run.id == run_id).values(heartbeat=now))
    if beat.rowcount == 0:
        raise NoSuchRun(run_id)
    # Update, else insert: one recorder writes a run's rows, so no other writer races for a key (and
    # the write transaction holds SQLite's lock); an upsert would need a dialect of its own per database.
    for (template, stage), (step, steps) in progress.items():
        check_stage_name(stage)
        found = session.execute(
            update(Progress)
            .where(Progress.run_id == run_id, Progress.template == template, Progress.stage == stage)
            .values(step=step, steps=steps, updated=now)
        )
        if found.rowcount == 0:
            session.add(
                Progress(run_id=run_id, template=template, stage=stage, step=step, steps=steps, updated=now)
            )
    for seq, blob in chunks:
        found = session.execute(
            update(TimelineChunk)
            .where(TimelineChunk.run_id == run_id, TimelineChunk.seq == seq)
            .values(samples=blob)
        )
        if found.rowcount == 0:
            session.add(TimelineChunk(run_id=run_id, seq=seq, samples=blob))


def read_progress(session: Session, run_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each run's progress rows, oldest first, as plain dicts (template, stage, step, steps, updated)."""
    out: dict[str, list[dict[str, Any]]] = {run_id: [] for run_id in run_ids}
    if not out:
        return out
    rows = session.scalars(select(Progress).where(Progress.run_id.in_(list(out))).order_by(Progress.id))
    for row in rows:
        out[row.run_id].append(
            {
                "template": row.template,
                "stage": row.stage,
                "step": row.step,
                "steps": row.steps,
                "updated": row.updated.isoformat(),
            }
        )
    return out


def read_timeline(session: Session, run_id: str) -> list[Sample]:
    """The run's samples in the order they were taken."""
    blobs = session.scalars(
        select(TimelineChunk.samples).where(TimelineChunk.run_id == run_id).order_by(TimelineChunk.seq)
    )
    return [sample for blob in blobs for sample in unpack(blob)]
