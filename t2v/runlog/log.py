"""`RunLog`: recording runs and stage attempts, and reading them back."""

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from t2v.runlog import live
from t2v.runlog.database import one_line, open_engine, retry, write_engine
from t2v.runlog.errors import NoSuchRun, RunLogUnavailable
from t2v.runlog.guard import SqliteFile, damaged, is_damaged, sqlite_path, unavailable
from t2v.runlog.migrate import upgrade
from t2v.runlog.schema import (
    KINDS,
    RUN_STATUSES,
    Run,
    StageRun,
    check,
    check_job_key,
    check_stage_name,
    names_of,
    utcnow,
    with_stages,
)
from t2v.runlog.sweep import close_dead_rows

log = logging.getLogger(__name__)

_ERROR_MAX_CHARS = 2000

T = TypeVar("T")


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
    peak_cgroup_gib: float | None = None
    row_id: int = 0
    attempt: int = 0


class RunLog:
    """The run log database; cheap to create, safe to use from several threads and processes."""

    def __init__(self, url: str) -> None:
        engine = open_engine(url)
        self.url = engine.url.render_as_string(hide_password=True)
        self._engine = engine
        self._write_engine = write_engine(engine)
        path = sqlite_path(engine)
        self._where = str(path or self.url)  # what messages name: the file a person can move aside
        try:
            # The tables are created or upgraded here, by the migrations (t2v.runlog.migrate); when the
            # schema is current this is one read of its version.
            self._retry(lambda: upgrade(engine, where=self._where))
        except SQLAlchemyError as e:
            engine.dispose()
            if is_damaged(e):
                raise damaged(self._where, e) from e
            raise RunLogUnavailable(f"cannot open the run log at {self.url}: {one_line(e)}") from e
        except RunLogUnavailable:
            engine.dispose()
            raise
        # Taken once the schema exists, so the file does too: every later transaction compares
        # against it, because SQLite would go on writing to a deleted file without a word.
        self._file = SqliteFile(path, engine) if path is not None else None

    def still_open(self) -> bool:
        """False once its SQLite file is gone or replaced (a process then opens the run log again)."""
        try:
            if self._file is not None:
                self._file.check()
        except RunLogUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close pooled connections; the object stays usable and reconnects on demand."""
        self._engine.dispose()

    # -- transactions ---------------------------------------------------------------------

    def _retry(self, op: Callable[[], T]) -> T:
        # The policy lives in database.retry; this stays a method for callers (the tests) that reach
        # it through a RunLog.
        return retry(op)

    def _write(self, fn: Callable[[Session], T]) -> T:
        def op() -> T:
            with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._guarded(op, writing=True)

    def _read(self, fn: Callable[[Session], T]) -> T:
        def op() -> T:
            with Session(self._engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._guarded(op, writing=False)

    def _guarded(self, op: Callable[[], T], *, writing: bool) -> T:
        """`op` with retries, refused if the SQLite file went away; a database that cannot be used
        raises RunLogUnavailable (one line) instead of SQLAlchemy's error with its SQL."""
        if self._file is not None:
            self._file.check()
        try:
            return self._retry(op)
        except SQLAlchemyError as e:
            lost = unavailable(e, self._where, writing=writing)
            if lost is None:
                raise
            raise lost from e

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
        check(kind, KINDS, "run kind")
        run_id = uuid.uuid4().hex

        def insert(session: Session) -> None:
            if parent_run_id is not None and session.get(Run, parent_run_id) is None:
                raise NoSuchRun(parent_run_id)
            session.add(
                Run(
                    id=run_id,
                    kind=kind,
                    started=utcnow(),
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
        """Record the end of a run with its final status ("ok", "failed" or "interrupted")."""
        check(status, RUN_STATUSES[1:], "final run status")

        def set_status(session: Session) -> None:
            result = session.execute(
                update(Run).where(Run.id == run_id).values(status=status, finished=utcnow())
            )
            if result.rowcount == 0:
                raise NoSuchRun(run_id)

        self._write(set_status)

    # -- stages -----------------------------------------------------------------------------

    def _insert_stage(self, row: StageRun) -> tuple[int, int]:
        def insert(session: Session) -> tuple[int, int]:
            if session.get(Run, row.run_id) is None:
                raise NoSuchRun(row.run_id)
            # Rows under the stage's old name are attempts too: opening the run log renames them, but
            # a process of an older release may still be writing them.
            earlier = session.scalar(
                select(func.count())
                .select_from(StageRun)
                .where(StageRun.job_key == row.job_key, StageRun.stage.in_(names_of(row.stage)))
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
        check_stage_name(stage)
        check_job_key(job_key)
        row_id, attempt = self._insert_stage(
            StageRun(
                run_id=run_id,
                job_key=job_key,
                template=template,
                stage=stage,
                model=model,
                plan=plan,
                started=utcnow(),
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
            # PostgreSQL refuses NUL in text, which SQLite stores; a message may carry one from a buffer.
            error = f"{type(e).__name__}: {e}".replace("\x00", "\\x00")[:_ERROR_MAX_CHARS]
            wall_s = time.perf_counter() - t0
            try:
                self._finish_stage(row_id, record, status=status, wall_s=wall_s, error=error)
            except RunLogUnavailable as lost:
                # Already one line that says what happened; the next write raises it for the run.
                log.error("could not record the end of stage row %d: %s", row_id, lost)
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
            "finished": utcnow(),
            "wall_s": wall_s,
            "error": error,
            "plan": record.plan,
            "output_key": record.output_key,
            "peak_allocated_gib": record.peak_allocated_gib,
            "peak_reserved_gib": record.peak_reserved_gib,
            "peak_nvml_gib": record.peak_nvml_gib,
            "peak_rss_gib": record.peak_rss_gib,
            "peak_cgroup_gib": record.peak_cgroup_gib,
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
        check_stage_name(stage)
        check_job_key(job_key)
        now = utcnow()
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
        return self._write(lambda session: close_dead_rows(session, host))

    # -- a night as it runs (t2v.runlog.live) ------------------------------------------------

    def record_live(
        self,
        run_id: str,
        *,
        progress: Mapping[live.ProgressKey, live.ProgressValue],
        chunks: Sequence[tuple[int, bytes]] = (),
    ) -> None:
        """One beat of a running night: its heartbeat, the progress rows that changed and the timeline
        chunks that did (`(seq, packed samples)`), in one short transaction."""
        self._write(
            lambda session: live.write(session, run_id, progress=progress, chunks=chunks, now=utcnow())
        )

    def progress(self, run_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Each run's progress rows (template, stage, step, steps, updated), oldest first."""
        return self._read(lambda session: live.read_progress(session, list(run_ids)))

    def timeline(self, run_id: str) -> list[live.Sample]:
        """The run's memory samples (`live.SAMPLE_FIELDS`), oldest first; empty for a run without them."""
        return self._read(lambda session: live.read_timeline(session, run_id))

    # -- reading --------------------------------------------------------------------------

    def runs(self, *, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs first, each with its stage rows (oldest first) under "stages"."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")

        def read(session: Session) -> list[dict[str, Any]]:
            found = session.scalars(select(Run).order_by(Run.started.desc(), Run.id).limit(limit)).all()
            return with_stages(session, list(found))

        return self._read(read)

    def run(self, run_id: str) -> dict[str, Any]:
        """One run with its stage rows (oldest first) under "stages"; NoSuchRun if it is not there."""

        def read(session: Session) -> dict[str, Any]:
            found = session.get(Run, run_id)
            if found is None:
                raise NoSuchRun(run_id)
            return with_stages(session, [found])[0]

        return self._read(read)

    def last_run_id(self, *, kind: str | tuple[str, ...] | None = None) -> str | None:
        """Id of the newest run, or of the newest run of this kind (or of these kinds)."""
        stmt = select(Run.id).order_by(Run.started.desc(), Run.id).limit(1)
        if kind is not None:
            kinds = (kind,) if isinstance(kind, str) else kind
            for one in kinds:
                check(one, KINDS, "run kind")
            stmt = stmt.where(Run.kind.in_(kinds))
        return self._read(lambda session: session.scalar(stmt))
