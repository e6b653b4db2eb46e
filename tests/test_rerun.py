"""`t2v rerun` and the rerun flow: a failed night finished with only its missing stages, linked to it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from flows.nightly import nightly
from flows.rerun import rerun
from t2v.jobs import JobSpec
from t2v.media import Watermark
from t2v.pipeline import PIPELINE
from t2v.rerun import AlreadyDone, Night, NothingToRerun, night_to_rerun
from t2v.runlog import RunLog, sqlite_url
from t2v_cli.main import app

STAGES = [stage.name for stage in PIPELINE]
FOX = {"name": "fox", "prompt": "a red fox running through snow"}
SEA = {"name": "sea", "prompt": "waves rolling onto a beach", "guidance": 1.0}


def _runlog(data_dir: Path) -> RunLog:
    return RunLog(sqlite_url(data_dir / "runlog.sqlite"))


def _store_files(data_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (data_dir / "store").rglob("*") if p.is_file()}


def test_rerun_computes_only_what_the_failed_night_left(data_dir, write_catalogue, monkeypatch):
    # sea has one diffusion plan (no CFG to split), so it fails; fox falls back to its second plan.
    monkeypatch.setenv("T2V_INJECT_OOM", "diffuse:cpu-cfg2")
    catalogue = write_catalogue(FOX, SEA)
    first = nightly(str(catalogue), "tiny")
    assert list(first["failed"]) == ["sea"]
    monkeypatch.delenv("T2V_INJECT_OOM")
    # The catalogue changes after the night: the re-run still finishes the night as it was.
    catalogue.write_text(catalogue.read_text().replace("waves rolling", "a storm rolling"))
    stored = _store_files(data_dir)

    second = rerun(first["run_id"])

    assert second["failed"] == {} and set(second["clips"]) == {"fox", "sea"}
    assert second["clips"]["fox"] == first["clips"]["fox"]  # the original night's outputs folder
    log = _runlog(data_dir)
    run = log.run(second["run_id"])
    assert (run["kind"], run["status"], run["parent_run_id"]) == ("rerun", "ok", first["run_id"])
    rows = [(r["template"], r["stage"], r["status"]) for r in run["stages"]]
    assert sorted(rows, key=lambda row: (STAGES.index(row[1]), row[0])) == [
        ("fox", "encode", "skipped"),
        ("sea", "encode", "skipped"),
        ("fox", "diffuse", "skipped"),
        ("sea", "diffuse", "ok"),
        ("fox", "decode", "skipped"),
        ("sea", "decode", "ok"),
        ("fox", "finish", "skipped"),
        ("sea", "finish", "ok"),
    ]
    # What the first night made was not touched, let alone remade.
    assert {p: t for p, t in _store_files(data_dir).items() if p in stored} == stored
    both = [log.run(first["run_id"]), run]
    oks = Counter((r["template"], r["stage"]) for r in both for r in r["stages"] if r["status"] == "ok")
    assert oks == {(t, s): 1 for t in ("fox", "sea") for s in STAGES}


def test_cli_rerun_last_after_an_ok_night_does_nothing(data_dir, write_catalogue):
    catalogue = write_catalogue(SEA)
    runner = CliRunner()
    assert runner.invoke(app, ["nightly", "--catalogue", str(catalogue)]).exit_code == 0

    result = runner.invoke(app, ["rerun", "--last"])

    assert result.exit_code == 0, result.output
    assert "finished ok; nothing to re-run" in result.stdout
    assert [r["kind"] for r in _runlog(data_dir).runs()] == ["nightly"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a RUN_ID or --last"),
        (["abc", "--last"], "give a RUN_ID or --last"),
        (["no-such-run"], "no run 'no-such-run' in the run log"),
        (["--last"], "no nightly run in the run log yet"),
    ],
)
def test_cli_rerun_bad_target_is_one_line_exit_2(args, message, data_dir):
    result = CliRunner().invoke(app, ["rerun", *args])

    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_night_to_rerun_refuses_runs_it_cannot_finish(tmp_path):
    log = RunLog(sqlite_url(tmp_path / "runlog.sqlite"))
    night = Night(jobs=(JobSpec(template="a", prompt="p"),), outputs_dir=tmp_path / "out")
    generate = log.start_run(kind="generate", model="tiny")
    log.finish_run(generate, status="failed")
    with pytest.raises(NothingToRerun, match="is a generate run"):
        night_to_rerun(log, generate)
    running = log.start_run(kind="nightly", model="tiny", jobs_json=night.to_json())
    with pytest.raises(NothingToRerun, match="is still running"):
        night_to_rerun(log, None)
    log.finish_run(running, status="ok")
    with pytest.raises(AlreadyDone):
        night_to_rerun(log, running)
    old = log.start_run(kind="nightly", model="tiny", catalogue="night.toml")
    log.finish_run(old, status="interrupted")
    with pytest.raises(NothingToRerun, match="older t2v that kept no job specs.*--catalogue night.toml"):
        night_to_rerun(log, old)


def test_night_round_trips_through_json(tmp_path):
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (8, 8)).save(logo)
    night = Night(
        jobs=(
            JobSpec(template="a", prompt="p", seed=2**63 - 1, guidance=1.0),
            JobSpec(template="b", prompt="q", watermark=Watermark(image=logo, opacity=0.5)),
        ),
        outputs_dir=tmp_path / "outputs" / "2026-11-24",
        fp8_storage=True,
    )
    assert Night.from_json(night.to_json()) == night


def test_an_old_run_log_gains_the_jobs_json_column(tmp_path):
    path = tmp_path / "runlog.sqlite"
    RunLog(sqlite_url(path)).close()
    engine = create_engine(sqlite_url(path))
    with engine.begin() as conn:  # what a run log of the first release looks like
        conn.execute(text("ALTER TABLE runs DROP COLUMN jobs_json"))
        conn.execute(text("DROP TABLE t2v_alembic_version"))  # as a log from before the migrations
    engine.dispose()

    log = RunLog(sqlite_url(path))

    run_id = log.start_run(kind="nightly", model="tiny", jobs_json="{}")
    assert log.run(run_id)["jobs_json"] == "{}"
