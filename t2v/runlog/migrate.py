"""Bringing a run log to the schema this t2v writes: Alembic migrations (`migrations/versions/`), applied
when t2v opens the run log.

Every t2v process opens the run log, so when there is nothing to do the check is one read of the version
table, without importing Alembic: `HEAD` is the newest revision (tests/test_migrations.py keeps it equal
to the scripts'). Otherwise one process upgrades, in one transaction under the database's write lock
(SQLite's BEGIN IMMEDIATE, a PostgreSQL advisory lock) and after reading the version again inside it, so
two processes opening an old run log at once upgrade it once, and an upgrade that fails changes nothing.

A run log made before the migrations existed (by `create_all`, so without a version table) is stamped
at the first revision, whose tables it has, and then upgraded: the second revision adds what the older
releases lacked.
"""

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, inspect, text

from t2v.runlog.database import write_engine
from t2v.runlog.errors import RunLogTooNew

log = logging.getLogger(__name__)

HEAD = "0004"
"""The newest revision in `migrations/versions/`: what every run log is brought to."""
FIRST = "0001"
"""The revision that creates the tables; an unversioned run log that has them is stamped with it."""
VERSION_TABLE = "t2v_alembic_version"
"""Alembic's version table, under a name of its own: a database shared with another application that
uses Alembic (Prefect's server among them) keeps its own `alembic_version`."""
MIGRATIONS = Path(__file__).with_name("migrations")

# pg_advisory_xact_lock's key for "the run log's schema": any constant 64-bit number ("t2vrunlg").
_PG_LOCK_KEY = 0x7432_7672_756E_6C67


def upgrade(engine: Engine, *, where: str) -> tuple[str | None, str] | None:
    """Bring the run log behind `engine` to HEAD; (revision before, HEAD) if this call changed it, else None.

    Raises RunLogTooNew, before anything is written, if a newer t2v has migrated it past HEAD.
    """
    with engine.connect() as conn:
        found = read_version(conn)
    if found == HEAD:
        return None
    if found is not None:
        _check_known(found, where)  # before taking the write lock: a newer schema is not touched at all
    with write_engine(engine).begin() as conn:
        _lock(conn)
        found = read_version(conn)  # again, under the lock: another process may have upgraded meanwhile
        if found == HEAD:
            return None
        if found is not None:
            _check_known(found, where)
        was = _migrate(conn, found)
    log.info("run log %s: %s, now at schema %s", where, was, HEAD)
    return found, HEAD


def read_version(conn: Connection) -> str | None:
    """The run log's revision; None for a database without one (new, or made before migrations)."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def config(conn: Connection | None = None) -> Any:
    """Alembic's Config for the run log's migrations, on `conn` (env.py runs them on it)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _check_known(found: str, where: str) -> None:
    from alembic.script import ScriptDirectory

    known = {script.revision for script in ScriptDirectory.from_config(config()).walk_revisions()}
    if found not in known:
        raise RunLogTooNew(
            f"the run log at {where} has schema revision {found}, newer than this t2v's (up to {HEAD}): "
            f"it needs a t2v whose run-log migrations include revision {found}; upgrade t2v, or point "
            "T2V_DATABASE_URL at another run log. Nothing was written."
        )


def _lock(conn: Connection) -> None:
    # SQLite: the write engine's BEGIN IMMEDIATE already holds the file's write lock.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def _migrate(conn: Connection, found: str | None) -> str:
    """Upgrade to HEAD on `conn`; says what the run log was, for the log line."""
    from alembic import command

    cfg = config(conn)
    was = f"upgraded from schema {found}"
    if found is None:
        was = "created"
        if inspect(conn).has_table("runs"):
            command.stamp(cfg, FIRST)  # an earlier release's create_all made the tables
            was = "made before schema migrations, upgraded"
    command.upgrade(cfg, "head")
    return was
