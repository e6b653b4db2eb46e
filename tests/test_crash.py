"""Real processes, real signals: kill -9 at each stage, then `t2v rerun --last`; two nights at once.

The nightly runs are `python -m t2v_cli.main nightly` subprocesses. They talk to the session's Prefect
test server (PREFECT_API_URL) instead of starting a temporary server each, which would cost ~15 s a run
and leave an orphaned server process behind every kill -9.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import av
import pytest
from prefect.settings import PREFECT_API_URL
from safetensors.torch import load_file
from typer.testing import CliRunner

from t2v.runlog import RunLog, sqlite_url
from t2v_cli.main import app

REPO = Path(__file__).resolve().parents[1]
STAGES = ["encode", "diffuse", "decode", "finish"]  # t2v.pipeline.PIPELINE, without importing torch here
FOLDER = {"finish": "watermark"}
"""Store folders that keep a stage's old name (`Stage.store_name`)."""
TINY = "[defaults]\nheight = 64\nwidth = 96\nframes = 9\nsteps = 2\n"


def _catalogue(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "templates.toml"
    text = TINY + "".join(
        f'\n[[template]]\nname = "{name}"\nprompt = "a {name} at dusk"\nseed = {i}\n'
        for i, name in enumerate(names)
    )
    path.write_text(text)
    return path


def _nightly(data_dir: Path, catalogue: Path, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    environ |= {
        "T2V_DATA_DIR": str(data_dir),
        "DO_NOT_TRACK": "1",
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PYTHONPATH": str(REPO),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "t2v_cli.main", "nightly", "--catalogue", str(catalogue)],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(marker: Path, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"nightly ended ({proc.returncode}) before pausing:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {marker.name} after {timeout_s} s")
        time.sleep(0.05)


def _visible_files(data_dir: Path) -> list[Path]:
    """Every file under a final name in the store and the outputs (temporary `.partial-*` ones aside)."""
    return [
        p
        for folder in ("store", "outputs")
        for p in (data_dir / folder).rglob("*")
        if p.is_file() and not p.name.startswith(".partial-") and p.suffix != ".sha256"
    ]


def _assert_complete(path: Path) -> None:
    digest = path.with_name(path.name + ".sha256")
    if digest.exists():  # in the store: the bytes are those written
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip(), path
    if path.suffix == ".safetensors":
        assert load_file(str(path)), path
    else:
        with av.open(str(path)) as container:
            assert sum(1 for _ in container.decode(video=0)) > 0, path


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_at_a_stage_then_rerun_finishes_the_night_once(stage, data_dir, tmp_path, monkeypatch):
    catalogue = _catalogue(tmp_path / "night", "fox", "owl")
    proc = _nightly(data_dir, catalogue, T2V_PAUSE_AT=stage)
    _wait_for(data_dir / f"paused-at-{stage}", proc)

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    # The paused output exists, complete, under its temporary name only; everything visible is whole.
    assert list((data_dir / "store" / FOLDER.get(stage, stage)).rglob(".partial-*"))
    for path in _visible_files(data_dir):
        _assert_complete(path)
    runner = CliRunner()
    listed = runner.invoke(app, ["runs", "--json"])
    assert listed.exit_code == 0, listed.output
    (killed,) = json.loads(listed.stdout)
    assert (killed["kind"], killed["status"]) == ("nightly", "interrupted")
    # The paused job's row (the other job's may have ended beside it before the kill).
    assert "interrupted" in [r["status"] for r in killed["stages"] if r["stage"] == stage]

    result = runner.invoke(app, ["rerun", "--last"])

    assert result.exit_code == 0, result.output
    assert "2 clip(s), 0 failed" in result.stdout
    runs = RunLog(sqlite_url(data_dir / "runlog.sqlite")).runs(limit=5)
    assert [(r["kind"], r["status"], r["parent_run_id"]) for r in runs] == [
        ("rerun", "ok", killed["id"]),
        ("nightly", "interrupted", None),
    ]
    oks = Counter((r["template"], r["stage"]) for run in runs for r in run["stages"] if r["status"] == "ok")
    # Made once: an ok row, or (the other job's output, written beside the pause, renamed into place
    # just before the kill and before its row said ok) interrupted in the night and skipped by the re-run.
    rerun_rows, killed_rows = (
        {(r["template"], r["stage"]): r["status"] for r in run["stages"]} for run in runs
    )
    for done in ((t, s) for t in ("fox", "owl") for s in STAGES):
        made_by_the_night = killed_rows.get(done) == "interrupted" and rerun_rows[done] == "skipped"
        assert oks[done] == 1 or (oks[done] == 0 and made_by_the_night), done
    assert not list(data_dir.rglob(".partial-*"))  # swept at the re-run's start
    for path in _visible_files(data_dir):
        _assert_complete(path)
    assert len(list((data_dir / "outputs").rglob("*.mp4"))) == 2


def test_two_nights_at_once_share_one_run_log(data_dir, tmp_path):
    first = _nightly(data_dir, _catalogue(tmp_path / "a", "fox", "owl"))
    second = _nightly(data_dir, _catalogue(tmp_path / "b", "bee", "elk"))

    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "database is locked" not in err

    runs = RunLog(sqlite_url(data_dir / "runlog.sqlite")).runs(limit=10)
    assert sorted((r["kind"], r["status"]) for r in runs) == [("nightly", "ok")] * 2
    for run, names in zip(
        sorted(runs, key=lambda r: r["stages"][0]["template"]), [("bee", "elk"), ("fox", "owl")], strict=True
    ):
        rows = Counter((r["template"], r["status"]) for r in run["stages"])
        assert rows == {(name, "ok"): 4 for name in names}
