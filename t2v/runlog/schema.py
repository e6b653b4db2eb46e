"""The run log's tables, the values that go in them, and the in-place upgrades of older databases."""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    inspect,
    select,
    update,
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


class Run(_Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    started: Mapped[datetime] = mapped_column(_UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    # Free-form values are TEXT: PostgreSQL enforces VARCHAR lengths and SQLite does not, so a long
    # `--model` path used to crash every run on one and pass on the other. See _widen_columns.
    model: Mapped[str] = mapped_column(Text)
    catalogue: Mapped[str | None] = mapped_column(Text)
    parent_run_id: Mapped[str | None] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(Text)
    jobs_json: Mapped[str | None] = mapped_column(Text)
    """The night's job specs as the run saw them (t2v.rerun.Night), so `t2v rerun` finishes that
    night even if the catalogue was edited since. Added after the first release: see _add_columns."""


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
    against: page cache and other processes of the group included). Added after the first release."""
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    output_key: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)


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


def create_schema(conn: Connection) -> None:
    """Create missing tables and bring an older release's run log up to date, on `conn`'s transaction.

    create_all only adds missing tables and never alters existing ones. That is enough while the
    schema is young and a run log can be thrown away; once a column changes on a database whose
    history matters, this becomes an Alembic migration.
    """
    _Base.metadata.create_all(conn)
    _add_columns(conn)
    _widen_columns(conn)
    _rename_stages(conn)


_ADDED_COLUMNS = {"runs": ("jobs_json",), "stage_runs": ("peak_cgroup_gib",)}
"""Columns added to tables after their first release; create_all never alters an existing table."""


def _add_columns(conn: Connection) -> None:
    """Add later columns to a run log created by an older release (nullable, so old rows stay valid).

    A plain ALTER TABLE ... ADD COLUMN works on SQLite and PostgreSQL alike; this stays enough until a
    change needs data moved, which is when Alembic comes in.
    """
    inspector = inspect(conn)
    for table_name, names in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table_name)}
        table = _Base.metadata.tables[table_name]
        for name in names:
            if name not in present:
                kind = table.c[name].type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {name} {kind}")


def _widen_columns(conn: Connection) -> None:
    """Turn the VARCHAR(n) columns of an older release's run log into TEXT where the schema says TEXT.

    Only PostgreSQL needs it: it enforces the lengths, while SQLite ignores them, so an old SQLite file
    already takes any length. On PostgreSQL VARCHAR to TEXT rewrites no rows, and once done the
    inspection finds nothing to change, so every later open only reads the catalogue.
    """
    if conn.dialect.name != "postgresql":
        return
    inspector = inspect(conn)
    # sorted_tables: the same lock order in every process that upgrades at once.
    for table in _Base.metadata.sorted_tables:
        for column in inspector.get_columns(table.name):
            ours = table.c.get(column["name"])
            if ours is None or not isinstance(ours.type, Text):
                continue
            if getattr(column["type"], "length", None) is not None:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN {column['name']} TYPE TEXT")


RENAMED_STAGES = {"watermark": "finish"}
"""Stage names of older releases -> their current name: "watermark" is the last stage's old name."""


def _rename_stages(conn: Connection) -> None:
    """Rewrite stage rows of older releases under the stage's current name.

    Readers (the dashboard, `t2v rerun`, attempt numbers) then see one name per stage whatever release
    wrote the row. Idempotent: once no row has an old name this matches nothing and writes nothing.
    """
    table = StageRun.__table__
    for old, new in RENAMED_STAGES.items():
        conn.execute(update(table).where(table.c.stage == old).values(stage=new))


def names_of(stage: str) -> tuple[str, ...]:
    """`stage` and the older names it replaced, under which rows may still be written by a process of an
    older release that runs beside this one (only the next open of the run log renames those)."""
    return (stage, *(old for old, new in RENAMED_STAGES.items() if new == stage))
