import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, update
from sqlalchemy.exc import OperationalError

from t2v.runlog import NoSuchRun, Run, RunLog, RunLogUnavailable, StageRun, sqlite_url

REPO = Path(__file__).resolve().parents[1]
STAGE = {"job_key": "job-a", "template": "beach", "stage": "diffuse", "model": "tiny"}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "runs" / "runlog.sqlite")


@pytest.fixture
def log(url: str) -> RunLog:
    return RunLog(url)


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _pick(row: dict[str, object], *keys: str) -> list[object]:
    return [row[k] for k in keys]


def _set(url: str, model: type[Run] | type[StageRun], row_id: object, **values: object) -> None:
    # Stands in for another process or host having written the row.
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(update(model).where(model.id == row_id).values(**values))
    engine.dispose()


# -- schema and connection ------------------------------------------------------------------------


def test_creates_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "runlog.sqlite"
    log = RunLog(f"sqlite:///{path}")
    log.start_run(kind="nightly", model="tiny")
    assert path.exists()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with log._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_unreachable_sqlite_raises_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    url = f"sqlite:///{not_a_dir}/runlog.sqlite"
    with pytest.raises(RunLogUnavailable) as caught:
        RunLog(url)
    message = str(caught.value)
    assert url in message
    assert "\n" not in message


def test_unreachable_postgres_masks_password() -> None:
    # Nobody listens on port 1; without a PostgreSQL driver installed the failure comes sooner.
    with pytest.raises(RunLogUnavailable) as caught:
        RunLog("postgresql://t2v:hunter2@127.0.0.1:1/t2v")
    message = str(caught.value)
    assert "postgresql://t2v:***@127.0.0.1:1/t2v" in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_reopening_keeps_rows(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model="tiny")
    assert RunLog(url).run(run_id)["status"] == "running"


def test_reopening_a_current_run_log_changes_no_row(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model="tiny")
    with log.stage(run_id=run_id, **STAGE):
        pass
    # A row written under the last stage's old name after the upgrade, by a process of an older release.
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            insert(StageRun).values(
                run_id=run_id,
                job_key="job-a",
                template="beach",
                stage="watermark",
                model="tiny",
                attempt=1,
                started=datetime(2025, 1, 1, tzinfo=UTC),
                status="failed",
                pid=1,
            )
        )
    engine.dispose()

    reopened = RunLog(url)  # migration 0003 renamed the rows it found, once (tests/test_migrations.py)

    assert [s["stage"] for s in reopened.run(run_id)["stages"]] == ["diffuse", "watermark"]
    with reopened.stage(run_id=run_id, **(STAGE | {"stage": "finish"})) as record:
        assert record.attempt == 2  # ...and the old name still counts as an attempt of "finish"


def test_attempts_count_rows_an_older_process_writes_under_the_old_name(log: RunLog) -> None:
    # A process of the older release may still write "watermark" after this one opened the run log.
    run_id = log.start_run(kind="nightly", model="tiny")
    log.record_skip(run_id=run_id, **(STAGE | {"stage": "watermark"}), output_key="k")
    with log.stage(run_id=run_id, **(STAGE | {"stage": "finish"})) as record:
        assert record.attempt == 2


# -- runs ------------------------------------------------------------------------------------------


def test_run_lifecycle_and_listing(log: RunLog) -> None:
    first = log.start_run(kind="nightly", model="tiny", catalogue="cat.toml")
    second = log.start_run(kind="rerun", model="tiny", parent_run_id=first)
    log.finish_run(first, status="failed")

    listed = log.runs()
    assert [r["id"] for r in listed] == [second, first]
    json.dumps(listed)  # plain values only
    old = log.run(first)
    assert old["status"] == "failed"
    assert old["catalogue"] == "cat.toml"
    assert old["stages"] == []
    assert old["pid"] == os.getpid()
    assert datetime.fromisoformat(old["finished"]) >= datetime.fromisoformat(old["started"])
    assert old["started"].endswith("+00:00")
    assert log.run(second)["parent_run_id"] == first
    assert log.runs(limit=1)[0]["id"] == second

    assert log.last_run_id() == second
    assert log.last_run_id(kind="nightly") == first
    assert log.last_run_id(kind="generate") is None


def test_unknown_runs_and_values(log: RunLog) -> None:
    run_id = log.start_run(kind="generate", model="tiny")
    with pytest.raises(NoSuchRun):
        log.run("0" * 32)
    with pytest.raises(NoSuchRun):
        log.finish_run("0" * 32, status="ok")
    with pytest.raises(NoSuchRun):
        log.start_run(kind="rerun", model="tiny", parent_run_id="0" * 32)
    with pytest.raises(NoSuchRun):
        with log.stage(run_id="0" * 32, **STAGE):
            pass
    with pytest.raises(ValueError, match="kind"):
        log.start_run(kind="weekly", model="tiny")
    with pytest.raises(ValueError, match="status"):
        log.finish_run(run_id, status="running")


@pytest.mark.parametrize("stage", ["", "s" * 17, None])
def test_stage_names_must_fit_the_column(log: RunLog, stage: object) -> None:
    run_id = log.start_run(kind="generate", model="tiny")
    with pytest.raises(ValueError, match="stage name"):
        with log.stage(run_id=run_id, **(STAGE | {"stage": stage})):
            pass
    with pytest.raises(ValueError, match="stage name"):
        log.record_skip(run_id=run_id, **(STAGE | {"stage": stage}), output_key=None)
    assert log.run(run_id)["stages"] == []


def test_any_stage_name_that_fits_is_recorded(log: RunLog) -> None:
    # The stage registry lives above the run log, so a stage the run log has never heard of is fine.
    run_id = log.start_run(kind="generate", model="tiny")
    with log.stage(run_id=run_id, **(STAGE | {"stage": "upscale"})):
        pass
    log.record_skip(run_id=run_id, **(STAGE | {"stage": "s" * 16}), output_key="k")
    assert [s["stage"] for s in log.run(run_id)["stages"]] == ["upscale", "s" * 16]


LONG = "/mnt/models/" + "m" * 288  # 300 characters: the old VARCHAR(200) crashed it on PostgreSQL


def test_long_free_form_values_round_trip(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model=LONG, catalogue=LONG + ".toml")
    with log.stage(run_id=run_id, **(STAGE | {"template": LONG, "model": LONG}), plan=LONG) as record:
        record.output_key = LONG
    run = RunLog(url).run(run_id)
    assert (run["model"], run["catalogue"]) == (LONG, LONG + ".toml")
    assert _pick(run["stages"][0], "template", "model", "plan", "output_key") == [LONG] * 4


@pytest.mark.parametrize("job_key", ["", "k" * 129, None])
def test_job_keys_must_fit_the_column(log: RunLog, job_key: object) -> None:
    # Checked before the stage runs, so SQLite and PostgreSQL refuse the same keys.
    run_id = log.start_run(kind="generate", model="tiny")
    with pytest.raises(ValueError, match="job key"):
        with log.stage(run_id=run_id, **(STAGE | {"job_key": job_key})):
            pytest.fail("the stage ran")
    with pytest.raises(ValueError, match="job key"):
        log.record_skip(run_id=run_id, **(STAGE | {"job_key": job_key}), output_key=None)
    log.record_skip(run_id=run_id, **(STAGE | {"job_key": "k" * 128}), output_key=None)
    assert [len(s["job_key"]) for s in log.run(run_id)["stages"]] == [128]


# -- stages ----------------------------------------------------------------------------------------


def test_stage_ok_records_what_the_body_reports(log: RunLog) -> None:
    run_id = log.start_run(kind="generate", model="tiny")
    with log.stage(run_id=run_id, plan="gpu", **STAGE) as record:
        assert record.attempt == 1
        record.plan = "group"  # fell back to a leaner plan inside the stage
        record.output_key = "latents/abc"
        record.peak_allocated_gib = 1.5
        record.peak_reserved_gib = 2.0
        record.peak_nvml_gib = 2.5
        record.peak_rss_gib = 3.0

    (row,) = log.run(run_id)["stages"]
    assert row["status"] == "ok"
    assert row["id"] == record.row_id
    assert _pick(row, "job_key", "template", "stage", "model") == ["job-a", "beach", "diffuse", "tiny"]
    assert _pick(row, "plan", "output_key", "attempt", "pid") == ["group", "latents/abc", 1, os.getpid()]
    peaks = _pick(row, "peak_allocated_gib", "peak_reserved_gib", "peak_nvml_gib", "peak_rss_gib")
    assert peaks == [1.5, 2.0, 2.5, 3.0]
    assert row["error"] is None
    assert row["wall_s"] >= 0
    assert row["finished"] >= row["started"]


def test_stage_failed_records_error_and_reraises(log: RunLog) -> None:
    run_id = log.start_run(kind="generate", model="tiny")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with log.stage(run_id=run_id, **STAGE) as record:
            record.peak_reserved_gib = 7.9
            raise RuntimeError("CUDA out of memory")
    with pytest.raises(ValueError):
        with log.stage(run_id=run_id, **STAGE):
            raise ValueError("x" * 5000)

    first, second = log.run(run_id)["stages"]
    assert (first["status"], first["error"]) == ("failed", "RuntimeError: CUDA out of memory")
    assert first["peak_reserved_gib"] == 7.9
    assert first["finished"] is not None and first["wall_s"] is not None
    assert second["status"] == "failed"
    assert len(second["error"]) == 2000 and second["error"].startswith("ValueError: xxx")


def test_stage_interrupted_by_keyboard(log: RunLog) -> None:
    run_id = log.start_run(kind="generate", model="tiny")
    with pytest.raises(KeyboardInterrupt):
        with log.stage(run_id=run_id, **STAGE):
            raise KeyboardInterrupt
    assert log.run(run_id)["stages"][0]["status"] == "interrupted"


def test_stage_skips(log: RunLog) -> None:
    run_id = log.start_run(kind="rerun", model="tiny")
    with log.stage(run_id=run_id, **STAGE) as record:
        record.status = "skipped"
        record.output_key = "latents/abc"
    log.record_skip(run_id=run_id, **(STAGE | {"stage": "decode"}), output_key="frames/abc")
    with pytest.raises(ValueError, match="not 'done'"):
        with log.stage(run_id=run_id, **STAGE) as record:
            record.status = "done"

    body_skip, quick_skip, bad = log.run(run_id)["stages"]
    assert (body_skip["status"], body_skip["output_key"]) == ("skipped", "latents/abc")
    assert _pick(quick_skip, "status", "output_key", "wall_s") == ["skipped", "frames/abc", 0]
    assert quick_skip["stage"] == "decode" and quick_skip["finished"] == quick_skip["started"]
    assert bad["status"] == "failed"


def test_attempts_count_earlier_rows_across_runs(log: RunLog) -> None:
    first = log.start_run(kind="nightly", model="tiny")
    with pytest.raises(RuntimeError):
        with log.stage(run_id=first, **STAGE):
            raise RuntimeError("oom")
    with log.stage(run_id=first, **STAGE):
        pass
    rerun = log.start_run(kind="rerun", model="tiny", parent_run_id=first)
    with log.stage(run_id=rerun, **STAGE) as record:
        assert record.attempt == 3
    with log.stage(run_id=rerun, **(STAGE | {"stage": "decode"})):
        pass
    with log.stage(run_id=rerun, **(STAGE | {"job_key": "job-b"})):
        pass

    assert [s["attempt"] for s in log.run(first)["stages"]] == [1, 2]
    assert [s["attempt"] for s in log.run(rerun)["stages"]] == [3, 1, 1]


def test_running_row_visible_to_another_instance(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model="tiny")
    other = RunLog(url)
    with log.stage(run_id=run_id, **STAGE):
        (seen,) = other.run(run_id)["stages"]
        assert (seen["status"], seen["finished"], seen["attempt"]) == ("running", None, 1)
    assert other.run(run_id)["stages"][0]["status"] == "ok"


# -- interrupted rows ------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_mark_interrupted_closes_rows_of_dead_processes(url: str, log: RunLog) -> None:
    dead = _dead_pid()
    run_id = log.start_run(kind="nightly", model="tiny")
    with log.stage(run_id=run_id, **(STAGE | {"job_key": "alive"})):
        with log.stage(run_id=run_id, **STAGE) as record:
            _set(url, StageRun, record.row_id, pid=dead)
            assert log.mark_interrupted() == 1
            rows = {s["job_key"]: s for s in log.run(run_id)["stages"]}
            assert rows["job-a"]["status"] == "interrupted"
            assert rows["job-a"]["finished"] is not None
            assert rows["alive"]["status"] == "running"  # this process still runs it
            assert log.run(run_id)["status"] == "running"
            assert log.mark_interrupted() == 0

    _set(url, Run, run_id, pid=dead)
    log.mark_interrupted()
    assert log.run(run_id)["status"] == "interrupted"


def test_mark_interrupted_sees_a_recycled_pid(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model="tiny")
    with log.stage(run_id=run_id, **STAGE) as record:
        # Our pid, but the row predates this process: whoever wrote it is gone.
        _set(url, StageRun, record.row_id, started=datetime(2001, 1, 1, tzinfo=UTC))
        assert log.mark_interrupted() == 1


def test_mark_interrupted_leaves_other_hosts_alone(url: str, log: RunLog) -> None:
    run_id = log.start_run(kind="nightly", model="tiny")
    with log.stage(run_id=run_id, **STAGE) as record:
        _set(url, Run, run_id, host="some-other-host", pid=_dead_pid())
        _set(url, StageRun, record.row_id, pid=_dead_pid())
        assert log.mark_interrupted() == 0
        assert log.run(run_id)["status"] == "running"


def test_crashed_process_leaves_evidence(url: str, log: RunLog) -> None:
    crash = """
        import os, sys
        from t2v.runlog import RunLog
        log = RunLog(sys.argv[1])
        run_id = log.start_run(kind="nightly", model="tiny")
        with log.stage(run_id=run_id, job_key="k", template="t", stage="diffuse", model="tiny"):
            print(run_id, flush=True)
            os._exit(3)  # no cleanup at all, like a kill -9 or a driver crash
    """
    child = _python(crash, url)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 3, err
    run_id = out.strip()

    assert log.run(run_id)["stages"][0]["status"] == "running"
    assert log.mark_interrupted() == 1
    run = log.run(run_id)
    assert run["status"] == "interrupted"
    assert run["stages"][0]["status"] == "interrupted"


# -- concurrency -----------------------------------------------------------------------------------


WRITER = """
    import os, sys, time
    from pathlib import Path
    from t2v.runlog import RunLog
    url, ready, name = sys.argv[1:4]
    log = RunLog(url)  # both writers create the fresh database at once, too
    run_id = log.start_run(kind="generate", model="tiny")
    Path(ready, name).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(ready)) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    print(time.time())
    for i in range(100):
        with log.stage(run_id=run_id, job_key=f"job-{i % 10}", template="t", stage="diffuse",
                       model="tiny") as record:
            record.output_key = f"{name}-{i}"
    log.finish_run(run_id, status="ok")
    print(time.time())
"""


def test_two_processes_write_concurrently(url: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    writers = [_python(WRITER, url, str(ready), name) for name in ("a", "b")]
    spans = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        spans.append([float(t) for t in out.split()])
    # SQLite may let one writer win the lock again and again, so rows need not interleave; what
    # matters is that both were writing at the same time and neither failed.
    assert max(start for start, _ in spans) < min(end for _, end in spans), "the writers did not overlap"

    runs = RunLog(url).runs()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"ok"}
    stages = [s for r in runs for s in r["stages"]]
    assert len(stages) == 200
    assert {s["status"] for s in stages} == {"ok"}
    # The attempt count and the insert share a write lock, so no number is handed out twice.
    for job in range(10):
        attempts = sorted(s["attempt"] for s in stages if s["job_key"] == f"job-{job}")
        assert attempts == list(range(1, 21))


def test_write_waits_for_a_held_lock(tmp_path: Path) -> None:
    path = tmp_path / "runlog.sqlite"
    log = RunLog(sqlite_url(path))
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process mid-write
    release = threading.Timer(0.5, holder.execute, args=("COMMIT",))
    release.start()
    t0 = time.monotonic()
    run_id = log.start_run(kind="generate", model="tiny")
    assert time.monotonic() - t0 >= 0.4
    release.join()
    holder.close()
    assert log.run(run_id)["status"] == "running"


def test_retry_backs_off_only_on_locks(log: RunLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    tries: list[int] = []

    def locked_twice() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
        return "done"

    assert log._retry(locked_twice) == "done"
    assert len(tries) == 3

    def always_locked() -> None:
        tries.append(1)
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))

    tries.clear()
    with pytest.raises(OperationalError):
        log._retry(always_locked)
    assert len(tries) == 6

    def broken() -> None:
        tries.append(1)
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("disk I/O error"))

    tries.clear()
    with pytest.raises(OperationalError):
        log._retry(broken)
    assert len(tries) == 1
