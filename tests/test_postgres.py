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

from flows.nightly import nightly
from t2v.runlog import RunLog

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
