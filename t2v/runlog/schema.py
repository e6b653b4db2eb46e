"""The run log's tables and the values that go in them.

The tables are created and changed by the Alembic migrations in `migrations/versions/` (t2v.runlog.migrate
applies them when a run log is opened); these classes describe the newest revision, and
tests/test_migrations.py checks that the two agree. A schema change is a new migration and its change
here.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

KINDS = ("nightly", "generate", "rerun")
RUN_STATUSES = ("running", "ok", "failed", "interrupted")
STAGE_STATUSES = ("running", "ok", "skipped", "failed", "interrupted")


def utcnow() -> datetime:
    return datetime.now(UTC)


class _UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out.

    SQLite keeps no time zone and hands back naive values while PostgreSQL hands back aware
    ones; normalising here keeps the two back ends interchangeable for callers.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the run log; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class _Base(DeclarativeBase):
    pass


metadata = _Base.metadata
"""The tables as the newest migration leaves them (migrations/env.py's target_metadata)."""


class Run(_Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    started: Mapped[datetime] = mapped_column(_UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    # Free-form values are TEXT: PostgreSQL enforces VARCHAR lengths and SQLite does not, so a long
    # `--model` path used to crash every run on one and pass on the other (migration 0002).
    model: Mapped[str] = mapped_column(Text)
    catalogue: Mapped[str | None] = mapped_column(Text)
    parent_run_id: Mapped[str | None] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(Text)
    jobs_json: Mapped[str | None] = mapped_column(Text)
    """The night's job specs as the run saw them (t2v.rerun.Night), so `t2v rerun` finishes that
    night even if the catalogue was edited since. Added after the first release (migration 0002)."""
    heartbeat: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    """When the run's live recorder (t2v.engine.live) last wrote, about once a second while it runs: a
    night on another host that stops beating is taken for dead (t2v.runlog.sweep). Migration 0004."""


STAGE_NAME_MAX_CHARS = 16
"""Width of `stage_runs.stage`. The stage names themselves belong to the pipeline's stage registry,
which this lower layer does not import; the run log only checks that a name fits the column."""

JOB_KEY_MAX_CHARS = 128
"""Width of `stage_runs.job_key`, checked before a row is written. It stays a VARCHAR because it is
indexed, and PostgreSQL refuses index entries over about 2.7 kB where SQLite takes any length."""


class StageRun(_Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id"), index=True)
    job_key: Mapped[str] = mapped_column(String(JOB_KEY_MAX_CHARS), index=True)
    template: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(STAGE_NAME_MAX_CHARS))
    model: Mapped[str] = mapped_column(Text)
    plan: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = mapped_column(_UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    wall_s: Mapped[float | None] = mapped_column(Float)
    peak_allocated_gib: Mapped[float | None] = mapped_column(Float)
    peak_reserved_gib: Mapped[float | None] = mapped_column(Float)
    peak_nvml_gib: Mapped[float | None] = mapped_column(Float)
    peak_rss_gib: Mapped[float | None] = mapped_column(Float)
    peak_cgroup_gib: Mapped[float | None] = mapped_column(Float)
    """The process's memory cgroup's highest usage during the attempt (what its memory.max is measured
    against: page cache and other processes of the group included). Added after the first release
    (migration 0002)."""
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    output_key: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)


class Progress(_Base):
    """How far a job's stage is: one row per (run, template, stage), updated in place at most once a
    second by the live recorder (migration 0004). `steps` is None for a stage that does not count."""

    __tablename__ = "progress"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id"), index=True)
    template: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(STAGE_NAME_MAX_CHARS))
    step: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    updated: Mapped[datetime] = mapped_column(_UTCDateTime())


class TimelineChunk(_Base):
    """Up to `t2v.runlog.live.CHUNK_SAMPLES` memory samples of a run, packed (`t2v.runlog.live.pack`):
    a row a minute instead of a row a second (migration 0004)."""

    __tablename__ = "timeline"

    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    samples: Mapped[bytes] = mapped_column(LargeBinary)


def check(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ValueError unless `value` is one of `allowed` (a run kind, a status)."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def check_stage_name(stage: object) -> None:
    """Raise ValueError unless `stage` fits `stage_runs.stage`."""
    # Which stages exist is the pipeline's stage registry's business (a layer above this one); the
    # run log only refuses what it cannot store faithfully.
    if not isinstance(stage, str) or not 0 < len(stage) <= STAGE_NAME_MAX_CHARS:
        raise ValueError(
            f"a stage name is a non-empty string of at most {STAGE_NAME_MAX_CHARS} characters, not {stage!r}"
        )


def check_job_key(job_key: object) -> None:
    """Raise ValueError unless `job_key` fits `stage_runs.job_key` (checked here, not by the database,
    so SQLite and PostgreSQL refuse the same keys, before the stage runs)."""
    if not isinstance(job_key, str) or not 0 < len(job_key) <= JOB_KEY_MAX_CHARS:
        shown = job_key if not isinstance(job_key, str) or len(job_key) <= 40 else f"{job_key[:40]}..."
        raise ValueError(
            f"a job key is a non-empty string of at most {JOB_KEY_MAX_CHARS} characters, not {shown!r}"
        )


def with_stages(session: Session, runs: list[Run]) -> list[dict[str, Any]]:
    """`runs` as plain dicts, each with its stage rows (oldest first) under "stages"."""
    out = [_as_dict(r) | {"stages": []} for r in runs]
    by_id = {d["id"]: d for d in out}
    if by_id:
        rows = session.scalars(select(StageRun).where(StageRun.run_id.in_(list(by_id))).order_by(StageRun.id))
        for row in rows:
            by_id[row.run_id]["stages"].append(_as_dict(row))
    return out


def _as_dict(row: _Base) -> dict[str, Any]:
    # Plain values only, so that callers can hand the rows to json.dumps (the CLI, the dashboard).
    return {c.key: _jsonable(getattr(row, c.key)) for c in row.__table__.columns}


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


RENAMED_STAGES = {"watermark": "finish"}
"""Stage names of older releases -> their current name: "watermark" is the last stage's old name. The
rows an older release wrote are renamed by migration 0003; this is for rows written after it."""


def names_of(stage: str) -> tuple[str, ...]:
    """`stage` and the older names it replaced, under which rows may still be written by a process of an
    older release that runs beside this one, after migration 0003 renamed the rows it found."""
    return (stage, *(old for old, new in RENAMED_STAGES.items() if new == stage))
