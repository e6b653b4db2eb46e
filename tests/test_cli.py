"""The `t2v` command line: help, one-line errors before any work, exit codes, `runs`."""

import json

import pytest
import typer
from typer.testing import CliRunner

import flows.generate
import flows.nightly
from t2v.runlog import RunLog, sqlite_url
from t2v_cli.main import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_the_commands_are_there():
    assert {"generate", "nightly", "rerun", "runs"} <= set(COMMANDS)


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)])
def test_every_command_has_help_with_an_example(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["generate", "a cat", "--height", "33"], "`height`"),
        (["generate", "a cat", "--frames", "10"], "`frames`"),
        (["generate", ""], "`prompt`"),
        (["generate", "a cat", "--height", "tall"], "'--height'"),
        (["generate", "a cat", "--out", "cat.gif"], "'--out'"),
        (["generate", "a cat", "--model", "./no-such-model"], "`--model`"),
        (["generate", "a" * 600], "`prompt`"),
        (["nightly", "--catalogue", "no-such-catalogue.toml"], "no-such-catalogue.toml: catalogue not found"),
        (["nightly", "--model", "/no/such/model/folder"], "`--model`"),
        (["runs", "--limit", "-1"], "'--limit'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_runs(args, names, data_dir, monkeypatch):
    def no_flow(*args, **kwargs):
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.generate, "generate", no_flow)
    monkeypatch.setattr(flows.nightly, "nightly", no_flow)

    result = runner.invoke(app, args)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr
    assert not data_dir.exists()


def test_bad_catalogue_entry_names_the_template(data_dir, write_catalogue):
    catalogue = write_catalogue({"name": "fox", "prompt": "a fox", "frames": 8})

    result = runner.invoke(app, ["nightly", "--catalogue", str(catalogue)])

    assert result.exit_code == 2
    assert "template 'fox'" in result.stderr and "`frames`" in result.stderr
    assert not data_dir.exists()


def test_unreachable_run_log_is_exit_2(data_dir, monkeypatch):
    monkeypatch.setenv("T2V_DATABASE_URL", "not a url")

    result = runner.invoke(app, ["runs"])

    assert result.exit_code == 2
    assert result.stderr.startswith("error: the run log URL is not a valid SQLAlchemy URL")


def test_runs_json_parses(data_dir):
    log = RunLog(sqlite_url(data_dir / "runlog.sqlite"))
    run_id = log.start_run(kind="nightly", model="tiny", catalogue="templates.toml")
    stage = {"job_key": "k", "template": "fox", "stage": "encode", "model": "tiny", "plan": "encode:cpu"}
    with log.stage(run_id=run_id, **stage):
        pass
    log.finish_run(run_id, status="ok")

    result = runner.invoke(app, ["runs", "--json", "--limit", "5"])

    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)
    assert [r["id"] for r in runs] == [run_id]
    rows = [(s["stage"], s["status"], s["plan"]) for s in runs[0]["stages"]]
    assert rows == [("encode", "ok", "encode:cpu")]
    table = runner.invoke(app, ["runs"])
    assert table.exit_code == 0 and run_id in table.stdout and "encode:cpu" in table.stdout


def test_generate_prints_the_clip_path(data_dir, tmp_path):
    out = tmp_path / "fox.mp4"

    result = runner.invoke(
        app,
        [
            "generate",
            "a red fox",
            "--height",
            "32",
            "--width",
            "64",
            "--frames",
            "5",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and out.is_file()


def test_nightly_exits_1_when_a_job_fails(data_dir, write_catalogue, monkeypatch):
    monkeypatch.setenv("T2V_INJECT_OOM", "diffuse:*")
    catalogue = write_catalogue({"name": "sea", "prompt": "waves", "steps": 1})

    result = runner.invoke(app, ["nightly", "--catalogue", str(catalogue)])

    assert result.exit_code == 1, result.output
    assert "0 clip(s), 1 failed" in result.stdout
    assert "failed  sea  diffuse: NoPlanFits" in result.stdout
