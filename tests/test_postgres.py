"""The run log on PostgreSQL: its API and one tiny nightly run, against $T2V_TEST_POSTGRES_URL.

CI starts a server with `.ci/start-postgres`; each test gets a database of its own, dropped after.
"""

import os
import uuid
from collections.abc import Iterator
from datetime import UTC

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError
from test_migrations import open_at_once, schema_differences, upgrades

from flows.nightly import nightly
from t2v.runlog import RunLog, RunLogTooNew, RunLogUnavailable
from t2v.runlog.migrate import HEAD, VERSION_TABLE

TEST_URL = "T2V_TEST_POSTGRES_URL"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty database on the test server."""
    server = os.environ.get(TEST_URL)
    if not server:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{TEST_URL} is not set; CI must start PostgreSQL (see .ci/run)")
        pytest.skip(f'{TEST_URL} is not set (export T2V_TEST_POSTGRES_URL="$(.ci/start-postgres)")')
    name = f"t2v_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: RunLogs cached by open_runlog still hold pooled connections.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_runlog_api_on_postgres(pg_url):
    runlog = RunLog(pg_url)
    RunLog(pg_url).close()  # a second open finds the tables and leaves them alone

    run_id = runlog.start_run(kind="nightly", model="tiny", catalogue="/c.toml")
    with runlog.stage(run_id=run_id, job_key="j", template="fox", stage="encode", model="tiny") as record:
        record.plan, record.peak_reserved_gib, record.output_key = "gpu", 1.25, "k1"
    with pytest.raises(RuntimeError):
        with runlog.stage(run_id=run_id, job_key="j", template="fox", stage="diffuse", model="tiny"):
            raise RuntimeError("out of luck")
    with runlog.stage(run_id=run_id, job_key="j", template="fox", stage="diffuse", model="tiny"):
        pass
    runlog.record_skip(
        run_id=run_id, job_key="j", template="fox", stage="decode", model="tiny", output_key="k3"
    )
    runlog.finish_run(run_id, status="ok")

    run = runlog.run(run_id)
    assert (run["status"], run["catalogue"]) == ("ok", "/c.toml")
    rows = [(r["stage"], r["attempt"], r["status"], r["plan"], r["peak_reserved_gib"]) for r in run["stages"]]
    assert rows == [
        ("encode", 1, "ok", "gpu", 1.25),
        ("diffuse", 1, "failed", None, None),
        ("diffuse", 2, "ok", None, None),
        ("decode", 1, "skipped", None, None),
    ]
    assert run["stages"][1]["error"] == "RuntimeError: out of luck"
    assert runlog.runs(limit=5)[0]["id"] == run_id == runlog.last_run_id(kind="nightly")

    # A run whose process died is closed by the next sweep (the pid of a process that is gone).
    dead = runlog.start_run(kind="generate", model="tiny")
    with runlog._engine.begin() as conn:
        conn.execute(text("UPDATE runs SET pid = 2147483647 WHERE id = :id"), {"id": dead})
    runlog.mark_interrupted()
    assert runlog.run(dead)["status"] == "interrupted"
    # PostgreSQL hands back aware datetimes; the run log keeps them in UTC like SQLite's.
    assert runlog.runs(limit=1)[0]["started"].endswith("+00:00")
    started = runlog._read(lambda s: s.execute(text("SELECT started FROM runs LIMIT 1")).scalar())
    assert started.tzinfo is not None and started.utcoffset() == UTC.utcoffset(None)
    runlog.close()


LONG = "/mnt/models/" + "m" * 288  # 300 characters, over the VARCHAR(200) of older releases

# The tables as the releases before TEXT columns created them on PostgreSQL.
OLD_SCHEMA = """
CREATE TABLE runs (
    id VARCHAR(32) PRIMARY KEY, kind VARCHAR(16) NOT NULL, started TIMESTAMP WITH TIME ZONE NOT NULL,
    finished TIMESTAMP WITH TIME ZONE, status VARCHAR(16) NOT NULL, model VARCHAR(200) NOT NULL,
    catalogue VARCHAR(500), parent_run_id VARCHAR(32), pid INTEGER NOT NULL, host VARCHAR(255) NOT NULL,
    jobs_json TEXT
);
CREATE TABLE stage_runs (
    id SERIAL PRIMARY KEY, run_id VARCHAR(32) NOT NULL REFERENCES runs (id), job_key VARCHAR(128) NOT NULL,
    template VARCHAR(200) NOT NULL, stage VARCHAR(16) NOT NULL, model VARCHAR(200) NOT NULL,
    plan VARCHAR(100), attempt INTEGER NOT NULL, started TIMESTAMP WITH TIME ZONE NOT NULL,
    finished TIMESTAMP WITH TIME ZONE, wall_s FLOAT, peak_allocated_gib FLOAT, peak_reserved_gib FLOAT,
    peak_nvml_gib FLOAT, peak_rss_gib FLOAT, status VARCHAR(16) NOT NULL, error TEXT,
    output_key VARCHAR(500), pid INTEGER NOT NULL
);
CREATE INDEX ix_stage_runs_run_id ON stage_runs (run_id);
CREATE INDEX ix_stage_runs_job_key ON stage_runs (job_key);
INSERT INTO runs VALUES ('0123456789abcdef0123456789abcdef', 'nightly', now(), now(), 'ok', 'tiny',
    NULL, NULL, 1, 'old-host', NULL);
"""


OLD_ROWS = """
INSERT INTO runs VALUES ('0123456789abcdef0123456789abcdef', 'nightly', now(), now(), 'failed', 'tiny',
    '/c.toml', NULL, 1, 'old-host', NULL);
INSERT INTO stage_runs (run_id, job_key, template, stage, model, attempt, started, finished, peak_cgroup_gib,
    status, pid) VALUES
    ('0123456789abcdef0123456789abcdef', 'k', 'fox', 'decode', 'tiny', 1, now(), now(), 1.5, 'ok', 1),
    ('0123456789abcdef0123456789abcdef', 'k', 'fox', 'watermark', 'tiny', 1, now(), now(), NULL, 'failed', 1);
"""


def _round_trip_long_values(runlog: RunLog) -> None:
    run_id = runlog.start_run(kind="nightly", model=LONG, catalogue=LONG + ".toml")
    with runlog.stage(run_id=run_id, job_key="j", template=LONG, stage="encode", model=LONG, plan=LONG) as r:
        r.output_key = LONG
    with pytest.raises(RuntimeError):
        with runlog.stage(run_id=run_id, job_key="j", template="fox", stage="diffuse", model=LONG):
            raise RuntimeError("x" * 5000 + "\x00")  # cut to 2000 characters, NUL kept out of the text
    run = runlog.run(run_id)
    assert (run["model"], run["catalogue"]) == (LONG, LONG + ".toml")
    first, failed = run["stages"]
    assert [first[k] for k in ("template", "model", "plan", "output_key")] == [LONG] * 4
    assert (failed["status"], len(failed["error"])) == ("failed", 2000)


def test_long_values_round_trip_on_postgres(pg_url):
    _round_trip_long_values(RunLog(pg_url))


def test_an_old_varchar_run_log_is_widened_at_open(pg_url):
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(OLD_SCHEMA)
    with pytest.raises(DataError, match="too long"), engine.begin() as conn:  # what crashed every run
        conn.execute(text("UPDATE runs SET model = :m"), {"m": LONG})

    runlog = RunLog(pg_url)

    with engine.connect() as conn:
        types = dict(
            conn.execute(
                text(
                    "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                    " WHERE table_name IN ('runs', 'stage_runs')"
                )
            ).all()
        )
    engine.dispose()
    for column in ("model", "catalogue", "host"):
        assert types[f"runs.{column}"] == "text"
    for column in ("template", "model", "plan", "output_key"):
        assert types[f"stage_runs.{column}"] == "text"
    assert types["stage_runs.job_key"] == "character varying"  # indexed: checked before a write instead
    assert runlog.run("0123456789abcdef0123456789abcdef")["host"] == "old-host"  # old rows stay
    _round_trip_long_values(runlog)
    RunLog(pg_url).close()  # a second open finds nothing to widen
    assert _version(pg_url) == [HEAD]
    assert schema_differences(pg_url) == []


def _version(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def test_a_run_log_from_before_migrations_is_upgraded_once_on_postgres(pg_url, tmp_path):
    from t2v.runlog.schema import metadata

    engine = create_engine(pg_url)
    metadata.create_all(engine)  # what every open of the release before migrations did
    with engine.begin() as conn:
        conn.exec_driver_sql(OLD_ROWS)
    engine.dispose()

    results = open_at_once(pg_url, tmp_path / "ready")  # two processes at once: one upgrades

    assert [r.split("|")[0] for r in results] == ["1", "1"]
    upgraded = upgrades(results)
    assert len(upgraded) == 1 and "made before schema migrations" in upgraded[0], results
    assert _version(pg_url) == [HEAD]
    assert schema_differences(pg_url) == []
    run = RunLog(pg_url).run("0123456789abcdef0123456789abcdef")
    assert [(r["stage"], r["status"], r["peak_cgroup_gib"]) for r in run["stages"]] == [
        ("decode", "ok", 1.5),
        ("finish", "failed", None),  # renamed from "watermark" by revision 0003
    ]


def test_a_run_log_newer_than_the_code_is_refused_on_postgres(pg_url):
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {VERSION_TABLE} (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql(f"INSERT INTO {VERSION_TABLE} VALUES ('0099')")

    with pytest.raises(RunLogTooNew, match="schema revision 0099") as caught:
        RunLog(pg_url)

    assert "\n" not in str(caught.value) and "postgres" in str(caught.value)
    with engine.connect() as conn:  # nothing was created
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
        assert list(tables) == [VERSION_TABLE]
    engine.dispose()
    assert _version(pg_url) == ["0099"]


def test_a_dropped_database_is_one_line(pg_url):
    runlog = RunLog(pg_url)
    run_id = runlog.start_run(kind="nightly", model="tiny")
    runlog.close()
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{make_url(pg_url).database}" WITH (FORCE)'))
    admin.dispose()
    with pytest.raises(RunLogUnavailable) as caught:
        runlog.finish_run(run_id, status="ok")
    message = str(caught.value)
    assert "cannot write to the run log" in message and "\n" not in message and "in the store" in message


def test_nightly_on_postgres(pg_url, data_dir, write_catalogue, monkeypatch):
    monkeypatch.setenv("T2V_DATABASE_URL", pg_url)
    catalogue = write_catalogue({"name": "fox", "prompt": "a red fox running through snow"})

    summary = nightly(str(catalogue), "tiny")

    assert summary["failed"] == {}
    run = RunLog(pg_url).run(summary["run_id"])
    assert run["status"] == "ok"
    assert [(r["stage"], r["status"]) for r in run["stages"]] == [
        ("encode", "ok"),
        ("diffuse", "ok"),
        ("decode", "ok"),
        ("finish", "ok"),
    ]
    # Nothing went to the SQLite default beside it.
    assert not (data_dir / "runlog.sqlite").exists()
