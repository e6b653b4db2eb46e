"""Connecting to the run log's database: engine creation, SQLite settings, forks and lock retries.

Several processes (the nightly flow, a manual `generate`, the CLI listing runs) may write to the same
database at once, so every write is a short transaction and lock contention is retried in one place
(`retry`).
"""

import logging
import os
import random
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from t2v.runlog.errors import RunLogUnavailable

log = logging.getLogger(__name__)

_LOCK_TRIES = 6
_LOCK_FIRST_DELAY_S = 0.05

T = TypeVar("T")


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """SQLAlchemy URL of a SQLite file, absolute so that it does not depend on the working directory."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def one_line(exc: BaseException) -> str:
    """The driver's own message of a database error, on one line."""
    # SQLAlchemy errors carry the SQL and a docs link on later lines; the driver's own message
    # is the part a person can act on.
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def open_engine(url: str) -> Engine:
    """An engine for the run log at `url`, set up for this module's transactions; connects lazily.

    Raises RunLogUnavailable for a URL that is not valid, a driver that is not installed or a
    SQLite folder that cannot be created.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise RunLogUnavailable(f"the run log URL is not a valid SQLAlchemy URL: {e}") from e
    shown = parsed.render_as_string(hide_password=True)

    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        _make_sqlite_parent(parsed, shown)
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
        raise RunLogUnavailable(f"cannot open the run log at {shown}: {one_line(e)}") from e
    if engine.dialect.name == "sqlite":
        _install_sqlite_hooks(engine)
    _dispose_pool_in_forked_children(engine)
    return engine


def write_engine(engine: Engine) -> Engine:
    """`engine` for transactions that write: on SQLite they take the write lock when they begin."""
    return engine.execution_options(t2v_write=True)


def retry(op: Callable[[], T]) -> T:
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


def _is_locked(exc: OperationalError) -> bool:
    return "database is locked" in str(exc)


def _make_sqlite_parent(parsed: URL, shown: str) -> None:
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:") or parsed.query.get("uri"):
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunLogUnavailable(
            f"cannot open the run log at {shown}: cannot create its folder ({type(e).__name__}: {e})"
        ) from e


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


def _dispose_pool_in_forked_children(engine: Engine) -> None:
    # A forked child must not reuse the parent's pooled connections (two processes on one
    # SQLite handle corrupt its locking); close=False leaves the parent's connections alone.
    ref = weakref.ref(engine)

    def after_fork() -> None:
        forked = ref()
        if forked is not None:
            forked.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)
