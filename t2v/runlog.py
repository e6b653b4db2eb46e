"""The run log: one row per pipeline run and one per stage attempt.

A SQLite file by default; any SQLAlchemy URL works. Several processes (the nightly flow, a
manual `generate`, the CLI listing runs) may write to the same database at once, so every
write is a short transaction and lock contention is retried in one place (`RunLog._retry`).
"""

import logging
import os
import random
import socket
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil
from sqlalchemy import (
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from t2v.errors import T2VError

__all__ = [
    "KINDS",
    "RUN_STATUSES",
    "STAGES",
    "STAGE_STATUSES",
    "NoSuchRun",
    "Run",
    "RunLog",
    "RunLogUnavailable",
    "StageRecord",
    "StageRun",
    "sqlite_url",
]

log = logging.getLogger(__name__)

KINDS = ("nightly", "generate", "rerun")
RUN_STATUSES = ("running", "ok", "failed", "interrupted")
STAGES = ("encode", "diffuse", "decode", "watermark")
STAGE_STATUSES = ("running", "ok", "skipped", "failed", "interrupted")

_ERROR_MAX_CHARS = 2000
_LOCK_TRIES = 6
_LOCK_FIRST_DELAY_S = 0.05
# Slack between a process's creation time and the row it wrote; a process created later than
# this after the row cannot have written it, so the pid was recycled.
_PID_REUSE_SLACK_S = 1.0

T = TypeVar("T")


class RunLogUnavailable(T2VError):
    """The run log database cannot be reached."""


class NoSuchRun(T2VError, LookupError):
    """No run with this id is in the run log."""


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of a SQLite file, absolute so that it does not depend on the working directory."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def _utcnow() -> datetime:
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
    model: Mapped[str] = mapped_column(String(200))
    catalogue: Mapped[str | None] = mapped_column(String(500))
    parent_run_id: Mapped[str | None] = mapped_column(String(32))
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    jobs_json: Mapped[str | None] = mapped_column(Text)
    """The night's job specs as the run saw them (t2v.rerun.Night), so `t2v rerun` finishes that
    night even if the catalogue was edited since. Added after the first release: see _add_columns."""


class StageRun(_Base):
    __tablename__ = "stage_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), ForeignKey("runs.id"), index=True)
    job_key: Mapped[str] = mapped_column(String(128), index=True)
    template: Mapped[str] = mapped_column(String(200))
    stage: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(200))
    plan: Mapped[str | None] = mapped_column(String(100))
    attempt: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = mapped_column(_UTCDateTime())
    finished: Mapped[datetime | None] = mapped_column(_UTCDateTime())
    wall_s: Mapped[float | None] = mapped_column(Float)
    peak_allocated_gib: Mapped[float | None] = mapped_column(Float)
    peak_reserved_gib: Mapped[float | None] = mapped_column(Float)
    peak_nvml_gib: Mapped[float | None] = mapped_column(Float)
    peak_rss_gib: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    output_key: Mapped[str | None] = mapped_column(String(500))
    pid: Mapped[int] = mapped_column(Integer)


@dataclass
class StageRecord:
    """What the body of `RunLog.stage` reports back; written to the row when the body ends.

    `row_id` and `attempt` are filled in before the body runs, for its own logging; changing
    them has no effect.
    """

    plan: str | None = None
    output_key: str | None = None
    status: str = "ok"
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_nvml_gib: float | None = None
    peak_rss_gib: float | None = None
    row_id: int = 0
    attempt: int = 0


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def _is_locked(exc: OperationalError) -> bool:
    return "database is locked" in str(exc)


def _one_line(exc: BaseException) -> str:
    # SQLAlchemy errors carry the SQL and a docs link on later lines; the driver's own message
    # is the part a person can act on.
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _as_dict(row: _Base) -> dict[str, Any]:
    return {c.key: _jsonable(getattr(row, c.key)) for c in row.__table__.columns}


def _pid_alive(pid: int, since: datetime) -> bool:
    """Whether the process that wrote a row at `since` with this pid still runs."""
    if not psutil.pid_exists(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= since.timestamp() + _PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        # Access denied and the like: the process exists and we cannot prove it is a new one,
        # and marking a live stage interrupted is worse than leaving a dead one "running".
        return True


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module so _on_begin can choose the kind of BEGIN.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching to WAL needs a lock that another process may hold.
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            # WAL lets the CLI read while a run writes; the mode is stored in the file, so after
            # the first connection this is a no-op.
            cur.execute("PRAGMA journal_mode=WAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes cannot wait for the write lock
        # (SQLite answers "database is locked" at once to avoid a deadlock); taking the lock
        # up front makes the busy timeout apply and keeps read-then-insert (attempt numbers)
        # consistent across processes.
        if conn.get_execution_options().get("t2v_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


class RunLog:
    """The run log database; cheap to create, safe to use from several threads and processes."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as e:
            raise RunLogUnavailable(f"the run log URL is not a valid SQLAlchemy URL: {e}") from e
        shown = parsed.render_as_string(hide_password=True)

        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            _make_sqlite_parent(parsed.database, parsed.query, shown)
        elif parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
            # libpq waits for the OS TCP timeout (minutes) on a host that drops packets; a run
            # should fail fast and say so instead. Only libpq-based drivers take this argument.
            try:
                libpq = parsed.get_driver_name() in ("psycopg", "psycopg2")
            except ArgumentError:
                libpq = False
            if libpq:
                connect_args["connect_timeout"] = 10

        try:
            engine = create_engine(parsed, connect_args=connect_args)
        except (ArgumentError, ImportError) as e:
            raise RunLogUnavailable(f"cannot open the run log at {shown}: {_one_line(e)}") from e
        self.url = engine.url.render_as_string(hide_password=True)
        self._engine = engine
        if engine.dialect.name == "sqlite":
            _install_sqlite_hooks(engine)
        self._write_engine = engine.execution_options(t2v_write=True)
        _dispose_pool_in_forked_children(engine)

        try:
            self._retry(self._create_schema)
        except SQLAlchemyError as e:
            engine.dispose()
            raise RunLogUnavailable(f"cannot open the run log at {self.url}: {_one_line(e)}") from e

    def _create_schema(self) -> None:
        # create_all only adds missing tables and never alters existing ones. That is enough
        # while the schema is young and a run log can be thrown away; once a column changes on a
        # database whose history matters, this becomes an Alembic migration.
        # Inside one write transaction so two processes creating a fresh file do not both
        # decide that the tables are missing.
        with self._write_engine.begin() as conn:
            _Base.metadata.create_all(conn)
            _add_columns(conn)

    def close(self) -> None:
        """Close pooled connections; the object stays usable and reconnects on demand."""
        self._engine.dispose()

    # -- transactions ---------------------------------------------------------------------

    def _retry(self, op: Callable[[], T]) -> T:
        """Run `op` (a whole transaction), again with backoff while SQLite reports a lock.

        The busy timeout absorbs most contention; what remains are the cases where SQLite gives
        up at once (e.g. while another connection switches the file to WAL).
        """
        delay = _LOCK_FIRST_DELAY_S
        for attempt in range(1, _LOCK_TRIES + 1):
            try:
                return op()
            except OperationalError as e:
                if not _is_locked(e) or attempt == _LOCK_TRIES:
                    raise
                log.debug("run log locked (try %d of %d), retrying", attempt, _LOCK_TRIES)
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay *= 2
        raise AssertionError("unreachable")

    def _write(self, fn: Callable[[Session], T]) -> T:
        def op() -> T:
            with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._retry(op)

    def _read(self, fn: Callable[[Session], T]) -> T:
        def op() -> T:
            with Session(self._engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._retry(op)

    # -- runs -------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        kind: str,
        model: str,
        catalogue: str | None = None,
        parent_run_id: str | None = None,
        jobs_json: str | None = None,
    ) -> str:
        """Record a new run as "running" and return its id."""
        _check(kind, KINDS, "run kind")
        run_id = uuid.uuid4().hex

        def insert(session: Session) -> None:
            if parent_run_id is not None and session.get(Run, parent_run_id) is None:
                raise NoSuchRun(parent_run_id)
            session.add(
                Run(
                    id=run_id,
                    kind=kind,
                    started=_utcnow(),
                    finished=None,
                    status="running",
                    model=model,
                    catalogue=catalogue,
                    parent_run_id=parent_run_id,
                    jobs_json=jobs_json,
                    pid=os.getpid(),
                    host=socket.gethostname(),
                )
            )

        self._write(insert)
        return run_id

    def finish_run(self, run_id: str, *, status: str) -> None:
        _check(status, RUN_STATUSES[1:], "final run status")

        def set_status(session: Session) -> None:
            result = session.execute(
                update(Run).where(Run.id == run_id).values(status=status, finished=_utcnow())
            )
            if result.rowcount == 0:
                raise NoSuchRun(run_id)

        self._write(set_status)

    # -- stages -----------------------------------------------------------------------------

    def _insert_stage(self, row: StageRun) -> tuple[int, int]:
        def insert(session: Session) -> tuple[int, int]:
            if session.get(Run, row.run_id) is None:
                raise NoSuchRun(row.run_id)
            earlier = session.scalar(
                select(func.count())
                .select_from(StageRun)
                .where(StageRun.job_key == row.job_key, StageRun.stage == row.stage)
            )
            # A copy per try: after a rolled-back try the caller's object would carry that
            # session's state into the next one.
            fresh = StageRun(**{c.key: getattr(row, c.key) for c in StageRun.__table__.columns})
            fresh.attempt = (earlier or 0) + 1
            session.add(fresh)
            session.flush()
            return fresh.id, fresh.attempt

        return self._write(insert)

    @contextmanager
    def stage(
        self,
        *,
        run_id: str,
        job_key: str,
        template: str,
        stage: str,
        model: str,
        plan: str | None = None,
    ) -> Iterator[StageRecord]:
        """Log one attempt at one stage of one job around the body of a `with` block.

        The row is committed as "running" before the body starts, so a process that dies
        mid-stage leaves evidence that `mark_interrupted` later closes. The body may set
        `record.status = "skipped"` and fill in plan, output key and peaks.
        """
        _check(stage, STAGES, "stage")
        row_id, attempt = self._insert_stage(
            StageRun(
                run_id=run_id,
                job_key=job_key,
                template=template,
                stage=stage,
                model=model,
                plan=plan,
                started=_utcnow(),
                status="running",
                pid=os.getpid(),
            )
        )
        record = StageRecord(plan=plan, row_id=row_id, attempt=attempt)
        t0 = time.perf_counter()
        try:
            yield record
            if record.status not in ("ok", "skipped"):
                raise ValueError(f"a stage body may set status 'ok' or 'skipped', not {record.status!r}")
        except BaseException as e:
            # KeyboardInterrupt / SystemExit stop the stage without it having failed.
            status = "failed" if isinstance(e, Exception) else "interrupted"
            error = f"{type(e).__name__}: {e}"[:_ERROR_MAX_CHARS]
            wall_s = time.perf_counter() - t0
            try:
                self._finish_stage(row_id, record, status=status, wall_s=wall_s, error=error)
            except Exception:
                # The body's exception is the one that matters; a run log hiccup must not
                # replace it. The row stays "running" until mark_interrupted closes it.
                log.exception("could not record the end of stage row %d in the run log", row_id)
            raise
        self._finish_stage(row_id, record, status=record.status, wall_s=time.perf_counter() - t0, error=None)

    def _finish_stage(
        self, row_id: int, record: StageRecord, *, status: str, wall_s: float, error: str | None
    ) -> None:
        values = {
            "status": status,
            "finished": _utcnow(),
            "wall_s": wall_s,
            "error": error,
            "plan": record.plan,
            "output_key": record.output_key,
            "peak_allocated_gib": record.peak_allocated_gib,
            "peak_reserved_gib": record.peak_reserved_gib,
            "peak_nvml_gib": record.peak_nvml_gib,
            "peak_rss_gib": record.peak_rss_gib,
        }
        stmt = update(StageRun).where(StageRun.id == row_id).values(values)
        self._write(lambda session: session.execute(stmt))

    def record_skip(
        self,
        *,
        run_id: str,
        job_key: str,
        template: str,
        stage: str,
        model: str,
        output_key: str | None,
    ) -> None:
        """Record in one row that a stage was not run because its output already exists."""
        _check(stage, STAGES, "stage")
        now = _utcnow()
        self._insert_stage(
            StageRun(
                run_id=run_id,
                job_key=job_key,
                template=template,
                stage=stage,
                model=model,
                started=now,
                finished=now,
                wall_s=0.0,
                status="skipped",
                output_key=output_key,
                pid=os.getpid(),
            )
        )

    def mark_interrupted(self) -> int:
        """Close rows left "running" by processes of this host that are gone.

        Rows of other hosts are left alone: their pids mean nothing here. Returns how many
        stage rows were changed (runs are closed too but not counted).
        """
        host = socket.gethostname()

        def sweep(session: Session) -> int:
            stage_rows = session.execute(
                select(StageRun.id, StageRun.pid, StageRun.started)
                .join(Run, Run.id == StageRun.run_id)
                .where(StageRun.status == "running", Run.host == host)
            ).all()
            run_rows = session.execute(
                select(Run.id, Run.pid, Run.started).where(Run.status == "running", Run.host == host)
            ).all()
            dead_stages = [r.id for r in stage_rows if not _pid_alive(r.pid, r.started)]
            dead_runs = [r.id for r in run_rows if not _pid_alive(r.pid, r.started)]
            now = _utcnow()
            changed = 0
            if dead_stages:
                result = session.execute(
                    update(StageRun)
                    .where(StageRun.id.in_(dead_stages), StageRun.status == "running")
                    .values(status="interrupted", finished=now)
                )
                changed = result.rowcount
            if dead_runs:
                session.execute(
                    update(Run)
                    .where(Run.id.in_(dead_runs), Run.status == "running")
                    .values(status="interrupted", finished=now)
                )
            return changed

        return self._write(sweep)

    # -- reading --------------------------------------------------------------------------

    def _with_stages(self, session: Session, runs: list[Run]) -> list[dict[str, Any]]:
        out = [_as_dict(r) | {"stages": []} for r in runs]
        by_id = {d["id"]: d for d in out}
        if by_id:
            rows = session.scalars(
                select(StageRun).where(StageRun.run_id.in_(list(by_id))).order_by(StageRun.id)
            )
            for row in rows:
                by_id[row.run_id]["stages"].append(_as_dict(row))
        return out

    def runs(self, *, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs first, each with its stage rows (oldest first) under "stages"."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")

        def read(session: Session) -> list[dict[str, Any]]:
            found = session.scalars(select(Run).order_by(Run.started.desc(), Run.id).limit(limit)).all()
            return self._with_stages(session, list(found))

        return self._read(read)

    def run(self, run_id: str) -> dict[str, Any]:
        def read(session: Session) -> dict[str, Any]:
            found = session.get(Run, run_id)
            if found is None:
                raise NoSuchRun(run_id)
            return self._with_stages(session, [found])[0]

        return self._read(read)

    def last_run_id(self, *, kind: str | tuple[str, ...] | None = None) -> str | None:
        """Id of the newest run, or of the newest run of this kind (or of these kinds)."""
        stmt = select(Run.id).order_by(Run.started.desc(), Run.id).limit(1)
        if kind is not None:
            kinds = (kind,) if isinstance(kind, str) else kind
            for one in kinds:
                _check(one, KINDS, "run kind")
            stmt = stmt.where(Run.kind.in_(kinds))
        return self._read(lambda session: session.scalar(stmt))


_ADDED_COLUMNS = {"runs": ("jobs_json",)}
"""Columns added to tables after their first release; create_all never alters an existing table."""


def _add_columns(conn: Any) -> None:
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


def _make_sqlite_parent(database: str | None, query: Any, shown: str) -> None:
    if not database or database == ":memory:" or database.startswith("file:") or query.get("uri"):
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunLogUnavailable(
            f"cannot open the run log at {shown}: cannot create its folder ({type(e).__name__}: {e})"
        ) from e


def _dispose_pool_in_forked_children(engine: Engine) -> None:
    # A forked child must not reuse the parent's pooled connections (two processes on one
    # SQLite handle corrupt its locking); close=False leaves the parent's connections alone.
    ref = weakref.ref(engine)

    def after_fork() -> None:
        forked = ref()
        if forked is not None:
            forked.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)
