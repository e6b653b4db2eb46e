"""The run log's Alembic migrations on SQLite: new run logs, run logs from before migrations, two processes
upgrading at once, a schema newer than the code. (PostgreSQL: tests/test_postgres.py.)

tests/data/runlog-before-alembic.sql is a run log written by the code before migrations (its header says
how it was made): a failed nightly run, a generate run and a night of an older release.
"""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from t2v.runlog import RunLog, RunLogTooNew, sqlite_url
from t2v.runlog.migrate import HEAD, MIGRATIONS, VERSION_TABLE

REPO = Path(__file__).resolve().parents[1]
DUMP = Path(__file__).parent / "data" / "runlog-before-alembic.sql"
NIGHT = "c3ba1d396eb2416284e64f8d422cd773"  # failed: fox ok, sea's decode out of memory on every plan
GENERATE = "ff87cef5cca040deb8bdfdb6e90f96f4"
OLDER = "5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b"  # an older release's night: "watermark" rows, no jobs_json


def _old_log(path: Path, root: Path, *, first_release: bool = False) -> Path:
    """The fixture run log at `path`, its @ROOT@ paths under `root`; `first_release`: without the columns
    that the first release lacked too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(DUMP.read_text().replace("@ROOT@", str(root)))
    if first_release:
        db.execute("ALTER TABLE runs DROP COLUMN jobs_json")
        db.execute("ALTER TABLE stage_runs DROP COLUMN peak_cgroup_gib")
    db.execute("PRAGMA journal_mode=WAL")  # as every release left it
    db.close()
    return path


def _rows(path: Path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("runs", "stage_runs")}
    finally:
        db.close()


def _version(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
    finally:
        db.close()


def schema_differences(url: str) -> list:
    """What Alembic's autogenerate would change to make the database match the ORM's tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from t2v.runlog.schema import metadata

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def test_head_is_the_newest_script_and_the_history_is_one_line():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS))
    assert script.get_heads() == [HEAD]  # HEAD is what the fast check at open compares with
    assert [s.revision for s in script.walk_revisions()] == ["0004", "0003", "0002", "0001"]


@pytest.mark.parametrize("made_by", ["migrations", "the release before", "the first release"])
def test_every_run_log_ends_with_the_tables_the_code_writes(made_by, tmp_path):
    path = tmp_path / "runlog.sqlite"
    if made_by != "migrations":
        _old_log(path, tmp_path, first_release=made_by == "the first release")
    RunLog(sqlite_url(path)).close()
    assert _version(path) == [(HEAD,)]
    assert schema_differences(sqlite_url(path)) == []


def test_an_old_run_log_keeps_every_row(tmp_path):
    path = _old_log(tmp_path / "runlog.sqlite", tmp_path)
    before = _rows(path)

    log = RunLog(sqlite_url(path))

    after = _rows(path)
    stage = 4  # stage_runs.stage: only the older release's last row is renamed
    old = before["stage_runs"]
    renamed = [r[:stage] + ("finish",) + r[stage + 1 :] if r[stage] == "watermark" else r for r in old]
    # runs.heartbeat (0004) comes last and is empty: those nights were not recorded live.
    assert [r[:-1] for r in after["runs"]] == before["runs"] and {r[-1] for r in after["runs"]} == {None}
    assert after["stage_runs"] == renamed
    assert sum(r[stage] == "watermark" for r in old) == 1
    # The renamed row is the first attempt of its job's finish: a new one is the second.
    with log.stage(
        run_id=OLDER, job_key="0f0e0d0c0b0a09080706050403020100", template="fox", stage="finish", model="tiny"
    ) as record:
        assert record.attempt == 2


def test_a_first_release_run_log_gains_its_columns_and_keeps_its_rows(tmp_path):
    path = _old_log(tmp_path / "runlog.sqlite", tmp_path, first_release=True)
    before = _rows(path)

    log = RunLog(sqlite_url(path))

    after = _rows(path)
    # The new columns (jobs_json, then heartbeat) come last and are empty: every earlier value is as it was.
    assert [r[:-2] for r in after["runs"]] == before["runs"]
    assert {r[-2:] for r in after["runs"]} == {(None, None)}
    assert len(after["stage_runs"]) == len(before["stage_runs"]) == 16
    assert log.run(log.start_run(kind="nightly", model="tiny", jobs_json="{}"))["jobs_json"] == "{}"


def test_an_old_run_log_is_read_by_runs_rerun_and_the_dashboard(data_dir, tmp_path):
    from typer.testing import CliRunner

    from t2v.dashboard import Dashboard, make_server
    from t2v.settings import Settings
    from t2v.store import Store
    from t2v_cli.main import app

    _old_log(data_dir / "runlog.sqlite", tmp_path)

    listed = CliRunner().invoke(app, ["runs", "--json"])
    assert listed.exit_code == 0, listed.output
    runs = {r["id"]: r for r in json.loads(listed.stdout)}
    assert [runs[r]["status"] for r in (NIGHT, GENERATE, OLDER)] == ["failed", "ok", "ok"]
    assert [len(runs[r]["stages"]) for r in (NIGHT, GENERATE, OLDER)] == [8, 4, 4]
    assert [s["stage"] for s in runs[OLDER]["stages"]] == ["encode", "diffuse", "decode", "finish"]

    settings = Settings.from_env()
    board = Dashboard(runlog=RunLog(settings.runlog_url), store=Store(settings.store_dir))
    server = make_server(board, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = "http://{}:{}".format(*server.server_address[:2])
        with urllib.request.urlopen(f"{base}/api/nights", timeout=10) as response:
            nights = {n["id"]: n for n in json.load(response)["nights"]}
        with urllib.request.urlopen(f"{base}/api/nights/{NIGHT}", timeout=10) as response:
            night = json.load(response)
    finally:
        server.shutdown()
        server.server_close()
    assert (nights[NIGHT]["jobs_ok"], nights[NIGHT]["jobs_failed"], nights[OLDER]["jobs_ok"]) == (1, 1, 1)
    assert [(f["template"], f["stage"], f["attempts"]) for f in night["failures"]] == [("sea", "decode", 2)]
    assert night["rerun_command"] == f"t2v rerun {NIGHT}"

    # The failed night's job specs come back from the upgraded log; its clips go to that night's folder.
    rerun = CliRunner().invoke(app, ["rerun", NIGHT])
    assert rerun.exit_code == 0, rerun.output
    outputs = data_dir / "outputs" / "2026-12-01"
    assert sorted(p.name for p in outputs.glob("*.mp4")) == ["fox.mp4", "sea.mp4"]
    finished = RunLog(settings.runlog_url).runs(limit=1)[0]
    assert (finished["kind"], finished["parent_run_id"], finished["status"]) == ("rerun", NIGHT, "ok")


OPENER = """
    import logging, os, sys, time
    from pathlib import Path
    url, ready, name = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from t2v.runlog import RunLog
    Path(ready, name).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    log = RunLog(url)
    print(len(log.runs(limit=10)))
"""


def open_at_once(url: str, ready: Path) -> list[str]:
    """Two processes opening the run log at `url` at the same moment; what each printed (how many runs it
    read) and logged, as "count|log"."""
    ready.mkdir()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    code = textwrap.dedent(OPENER)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(ready), name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(f"{out.strip()}|{err}")
    return results


def upgrades(results: list[str]) -> list[str]:
    """The lines of `open_at_once`'s processes that say they upgraded the run log."""
    return [line for r in results for line in r.splitlines() if line.startswith("t2v.runlog.migrate")]


def test_two_processes_opening_an_old_run_log_upgrade_it_once(tmp_path):
    path = _old_log(tmp_path / "runlog.sqlite", tmp_path, first_release=True)

    results = open_at_once(sqlite_url(path), tmp_path / "ready")

    assert [r.split("|")[0] for r in results] == ["3", "3"]  # each one reads every run of the old log
    upgraded = upgrades(results)
    assert len(upgraded) == 1 and "made before schema migrations" in upgraded[0], results
    assert sum("Running upgrade 0001 -> 0002" in r for r in results) == 1
    assert _version(path) == [(HEAD,)]
    assert len(_rows(path)["stage_runs"]) == 16


def test_opening_a_current_run_log_reads_its_version_only(tmp_path):
    # Every t2v process opens the run log: when it is current, Alembic (0.3 s to import) stays unloaded.
    url = sqlite_url(tmp_path / "runlog.sqlite")
    RunLog(url).close()
    code = "import sys; from t2v.runlog import RunLog; RunLog(sys.argv[1]); print('alembic' in sys.modules)"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False"], out.stderr


def test_an_upgrade_that_fails_leaves_the_run_log_as_it_was(tmp_path, monkeypatch):
    from t2v.runlog import migrate

    path = _old_log(tmp_path / "runlog.sqlite", tmp_path, first_release=True)
    before = _rows(path)
    real = migrate._migrate

    def fail_after(conn, found):
        real(conn, found)  # every revision applied, on the open transaction...
        raise RuntimeError("power cut")  # ...which then never commits

    monkeypatch.setattr(migrate, "_migrate", fail_after)
    with pytest.raises(RuntimeError, match="power cut"):
        RunLog(sqlite_url(path))

    assert _rows(path) == before  # the rows, the old columns (no jobs_json) and no rename
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        _version(path)


@pytest.fixture
def too_new(data_dir: Path, tmp_path: Path) -> Path:
    """The default run log, upgraded and then stamped with a revision a newer t2v would have made."""
    path = _old_log(data_dir / "runlog.sqlite", tmp_path)
    RunLog(sqlite_url(path)).close()
    db = sqlite3.connect(path)
    with db:
        db.execute(f"UPDATE {VERSION_TABLE} SET version_num = '0099'")
    db.close()
    return path


def test_a_run_log_newer_than_the_code_is_refused_with_the_version_it_needs(too_new, write_catalogue):
    from typer.testing import CliRunner

    from t2v_cli.main import app

    before = too_new.read_bytes()
    catalogue = write_catalogue({"name": "fox", "prompt": "a fox"})
    for args in (["runs"], ["nightly", "--catalogue", str(catalogue)], ["rerun", "--last"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert "schema revision 0099" in result.stderr and f"up to {HEAD}" in result.stderr
    # Nothing written: not a row, not the version, not a clip.
    assert too_new.read_bytes() == before
    assert not (too_new.parent / "outputs").exists()
    with pytest.raises(RunLogTooNew):
        RunLog(sqlite_url(too_new))
