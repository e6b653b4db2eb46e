"""A SQLite run log that disappears, is replaced or is damaged: one RunLogUnavailable line, no traceback."""

import logging
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from t2v.runlog import RunLog, RunLogUnavailable, sqlite_url

STAGE = {"job_key": "job-a", "template": "beach", "stage": "diffuse", "model": "tiny"}
PAGE = 4096  # SQLite's default page size, which the run log keeps


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "runlog.sqlite"


def _one_line(caught: pytest.ExceptionInfo[RunLogUnavailable], path: Path) -> str:
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# -- a file deleted or replaced while open ---------------------------------------------------------


def test_a_deleted_file_stops_the_next_stage_row(path: Path) -> None:
    log = RunLog(sqlite_url(path))
    run_id = log.start_run(kind="nightly", model="tiny")
    with log.stage(run_id=run_id, **STAGE):
        pass
    path.unlink()  # SQLite alone would go on writing to the unlinked inode and exit 0

    ran = False
    with pytest.raises(RunLogUnavailable) as caught:
        with log.stage(run_id=run_id, **(STAGE | {"stage": "decode"})):
            ran = True
    assert not ran, "the stage ran with no run log to record it"
    message = _one_line(caught, path)
    assert "is gone" in message and "in the store" in message and "t2v rerun" in message
    # Every later write of the run says the same, instead of recording into nothing.
    for write in (
        lambda: log.record_skip(run_id=run_id, **STAGE, output_key="k"),
        lambda: log.finish_run(run_id, status="ok"),
        lambda: log.runs(),
    ):
        with pytest.raises(RunLogUnavailable):
            write()
    assert not path.exists()
    # The next run creates a new run log under the same name.
    fresh = RunLog(sqlite_url(path))
    assert fresh.runs() == []
    assert fresh.run(fresh.start_run(kind="nightly", model="tiny"))["status"] == "running"


def test_a_file_deleted_mid_stage_fails_its_end(path: Path) -> None:
    log = RunLog(sqlite_url(path))
    run_id = log.start_run(kind="nightly", model="tiny")
    with pytest.raises(RunLogUnavailable) as caught:
        with log.stage(run_id=run_id, **STAGE) as record:
            record.output_key = "written to the store already"
            path.unlink()
    _one_line(caught, path)


def test_a_file_deleted_under_a_failing_stage_keeps_the_stage_error(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = RunLog(sqlite_url(path))
    run_id = log.start_run(kind="nightly", model="tiny")
    with pytest.raises(RuntimeError, match="out of luck"):
        with log.stage(run_id=run_id, **STAGE):
            path.unlink()
            raise RuntimeError("out of luck")
    (logged,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert str(path) in logged.getMessage() and logged.exc_info is None  # one line, no traceback


def test_a_replaced_file_is_not_written_by_the_old_run(path: Path) -> None:
    log = RunLog(sqlite_url(path))
    run_id = log.start_run(kind="nightly", model="tiny")
    path.unlink()
    other = RunLog(sqlite_url(path))  # e.g. `t2v runs` made a new one
    with pytest.raises(RunLogUnavailable) as caught:
        log.finish_run(run_id, status="ok")
    assert "replaced" in _one_line(caught, path)
    assert other.runs() == []


# -- damaged pages ---------------------------------------------------------------------------------


def _filled(path: Path) -> None:
    log = RunLog(sqlite_url(path))
    run_id = log.start_run(kind="nightly", model="tiny")
    for i in range(300):
        log.record_skip(run_id=run_id, **(STAGE | {"job_key": f"job-{i}"}), output_key="k" * 100)
    log.finish_run(run_id, status="ok")
    log.close()  # the last connection checkpoints the WAL into the file and removes it
    assert not path.with_name(path.name + "-wal").exists()


def _fix_in(message: str) -> None:
    assert "damaged" in message
    assert "move it aside" in message and "-wal" in message
    assert "creates a new run log" in message and "nothing is recomputed" in message


def test_garbage_in_the_middle_gives_the_fix(path: Path) -> None:
    _filled(path)
    pages = path.stat().st_size // PAGE
    assert pages > 10
    with path.open("r+b") as f:
        # A third of the pages, past the schema on page 1: some are stage rows every open reads.
        f.seek(pages // 3 * PAGE)
        f.write(b"\xff" * (pages // 3 * PAGE))

    with pytest.raises(RunLogUnavailable) as caught:
        RunLog(sqlite_url(path)).runs()
    message = _one_line(caught, path)
    _fix_in(message)
    assert "malformed" in message


def test_a_file_that_is_not_a_database_gives_the_fix(path: Path) -> None:
    _filled(path)
    with path.open("r+b") as f:
        f.write(b"not a database, just some bytes" * 8)
    with pytest.raises(RunLogUnavailable) as caught:
        RunLog(sqlite_url(path))
    _fix_in(_one_line(caught, path))
    assert "not a database" in str(caught.value)


def test_an_unusable_database_is_one_line_and_a_bug_keeps_its_traceback(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RunLog(sqlite_url(path))

    def full() -> None:
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(log, "_retry", lambda op: full())
    with pytest.raises(RunLogUnavailable) as caught:
        log.start_run(kind="nightly", model="tiny")
    assert "cannot write to the run log" in _one_line(caught, path)
    assert "disk is full" in str(caught.value)

    def bug() -> None:
        raise IntegrityError("INSERT ...", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))

    monkeypatch.setattr(log, "_retry", lambda op: bug())
    with pytest.raises(IntegrityError):
        log.start_run(kind="nightly", model="tiny")


def test_a_process_opens_its_run_log_again_once_the_file_it_had_is_gone(tmp_path):
    from t2v.context import open_runlog

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    first = open_runlog(url)
    assert open_runlog(url) is first  # one pool per URL
    first.start_run(kind="nightly", model="tiny")
    (tmp_path / "runs.db").unlink()

    again = open_runlog(url)

    assert again is not first
    assert again.start_run(kind="nightly", model="tiny") and len(again.runs()) == 1
