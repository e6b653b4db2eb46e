"""Noticing a run log that is gone, replaced or damaged, and saying so in one line.

SQLite keeps writing to a file that was deleted while it was open (the process still holds the inode),
so a run whose run log was removed would record its whole night into nothing and exit 0. A damaged file
makes SQLAlchemy raise with the SQL, a docs link and a traceback. Both become RunLogUnavailable, which
the CLI prints as one `error:` line, with what to do next.
"""

import os
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from t2v.runlog.database import one_line
from t2v.runlog.errors import RunLogUnavailable

# SQLite's primary result codes for a damaged file: SQLITE_CORRUPT ("database disk image is
# malformed") and SQLITE_NOTADB ("file is not a database").
_DAMAGE_CODES = (11, 26)
_DAMAGE_MESSAGES = ("database disk image is malformed", "file is not a database")

KEPT = (
    "the outputs made so far are in the store, and `t2v nightly` or `t2v rerun` skips them "
    "once the run log is back"
)
"""What a run that loses its run log still has: said so that nobody recomputes a night by hand."""


def sqlite_path(engine: Engine) -> Path | None:
    """The file behind a SQLite engine, absolute; None for other databases and in-memory or URI ones."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:") or engine.url.query.get("uri"):
        return None
    # Resolved now, against the directory SQLite itself opened it from.
    return Path(database).expanduser().resolve()


class SqliteFile:
    """A SQLite run log's file as it was when `engine` opened it; `check` says if it has changed."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self._engine = engine
        self._identity = _identity(path)

    def check(self) -> None:
        """Raise RunLogUnavailable if the file is gone or is another file (another inode) than at open."""
        now = _identity(self.path)
        if now == self._identity:
            return
        # Let go of the lost inode at once: pooled connections would keep it, and its disk space,
        # alive for as long as the process runs. (SQLite itself does not checkpoint into a file that
        # has moved, and a new empty file under the name discards the stale -wal.)
        self._engine.dispose()
        what = "is gone" if now is None else "was replaced by another file"
        raise RunLogUnavailable(
            f"the run log {self.path} {what} since this process opened it, so this run can no longer "
            f"be recorded; {KEPT}"
        )


def _identity(path: Path) -> tuple[int, int] | None:
    # (device, inode): a file deleted and created again under the same name is another inode.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def is_damaged(exc: BaseException) -> bool:
    """Whether `exc` (a SQLAlchemy error or the driver's own) says the SQLite file is damaged."""
    inner = getattr(exc, "orig", None) or exc
    code = getattr(inner, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _DAMAGE_CODES
    return any(m in str(inner) for m in _DAMAGE_MESSAGES)


def damaged(where: str, exc: BaseException) -> RunLogUnavailable:
    """The one-line error for a damaged SQLite run log at `where`, with the way out."""
    # The -wal and -shm files go with it: they belong to that file and may hold its latest writes.
    return RunLogUnavailable(
        f"the run log {where} is damaged ({one_line(exc)}); move it aside with its -wal and -shm "
        f"files (e.g. `mv {where} {where}.damaged`): the next run creates a new run log, and the store "
        "keeps every output, so nothing is recomputed"
    )


def unavailable(exc: SQLAlchemyError, where: str, *, writing: bool) -> RunLogUnavailable | None:
    """`exc` as a one-line RunLogUnavailable when the database is damaged or cannot be used; else None.

    Only damage and OperationalError (server gone, disk full or read-only, a lock held past every
    retry) are the run log being unavailable; other errors are bugs and keep their traceback.
    """
    if is_damaged(exc):
        return damaged(where, exc)
    if isinstance(exc, OperationalError):
        if writing:  # a run is what writes, so a run is what has outputs to keep
            return RunLogUnavailable(f"cannot write to the run log at {where}: {one_line(exc)}; {KEPT}")
        return RunLogUnavailable(f"cannot read the run log at {where}: {one_line(exc)}")
    return None
