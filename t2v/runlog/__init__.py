"""The run log: one row per pipeline run and one per stage attempt.

A SQLite file by default; any SQLAlchemy URL works. Several processes (the nightly flow, a
manual `generate`, the CLI listing runs) may write to the same database at once, so every
write is a short transaction and lock contention is retried in one place (`database.retry`).

`schema` holds the tables and the checks of what goes in them; `migrate` brings a run log to that
schema when it is opened, with the Alembic migrations in `migrations/`; `database` the engine, its
SQLite settings and the lock retries; `log` the `RunLog` API; `guard` the checks that the SQLite file
is still there and undamaged; `sweep` the closing of rows left by dead processes; `errors` the
exceptions.
"""

from t2v.runlog.database import RunLogUnavailable, sqlite_url
from t2v.runlog.errors import RunLogTooNew
from t2v.runlog.log import NoSuchRun, RunLog, StageRecord
from t2v.runlog.schema import KINDS, RUN_STATUSES, STAGE_STATUSES, Run, StageRun

__all__ = [
    "KINDS",
    "RUN_STATUSES",
    "STAGE_STATUSES",
    "NoSuchRun",
    "Run",
    "RunLog",
    "RunLogTooNew",
    "RunLogUnavailable",
    "StageRecord",
    "StageRun",
    "sqlite_url",
]
