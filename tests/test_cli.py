"""The `t2v` command line: help, one-line errors before any work, exit codes, `runs`."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import flows.generate
import flows.nightly
import flows.rerun
from t2v.errors import InvalidInput
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.rerun import AlreadyDone, Night, NothingToRerun, Rerun, prepare_rerun
from t2v.runlog import NoSuchRun, RunLog, sqlite_url
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


def test_generate_takes_its_defaults_and_help_from_jobspec():
    params = {p.name: p for p in typer.main.get_command(app).commands["generate"].params}
    job_fields = [f for f in dataclasses.fields(JobSpec) if f.name in params]

    assert {f.name for f in job_fields} >= {"prompt", "negative_prompt", "seed", "height", "width"}
    for field in job_fields:
        assert params[field.name].help == field.metadata["help"], field.name
        if field.default is not dataclasses.MISSING:
            assert params[field.name].default == field.default, field.name


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"T2V_VRAM_BUDGET_GB": "lots"}, "`T2V_VRAM_BUDGET_GB`"),
        ({"T2V_VRAM_BUDGET_GB": "-1"}, "`T2V_VRAM_BUDGET_GB` must be positive"),
        ({"T2V_COMPILE": "always"}, "`T2V_COMPILE`"),
    ],
)
@pytest.mark.parametrize("args", [["runs"], ["rerun", "--last"], ["dashboard"], ["generate", "a cat"]])
def test_bad_settings_are_one_line_exit_2(args, env, message, data_dir):
    result = runner.invoke(app, args, env=env)

    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
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


# --- the re-run preparation that `t2v rerun` (and the rerun flow) start from ---------------------

FOX = JobSpec(template="fox", prompt="a red fox", height=64, width=96, frames=9, steps=2)


def _killed_night(url: str, night: Night) -> str:
    """A nightly run started by a process that is gone now, as after kill -9: its row still says running."""
    code = (
        "import sys; from t2v.runlog import RunLog; "
        "print(RunLog(sys.argv[1]).start_run(kind='nightly', model='tiny', jobs_json=sys.argv[2]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url, night.to_json()], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_prepare_rerun_finishes_a_killed_night(tmp_path):
    url = sqlite_url(tmp_path / "runlog.sqlite")
    night = Night(jobs=(FOX,), outputs_dir=tmp_path / "outputs" / "2026-11-24")
    run_id = _killed_night(url, night)

    prepared = prepare_rerun(RunLog(url), None)

    assert isinstance(prepared, Rerun)
    assert prepared.parent["id"] == run_id and prepared.parent["status"] == "interrupted"
    assert prepared.night == night
    assert prepared.model == resolve_model("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.night = night  # type: ignore[misc]


def test_prepare_rerun_refuses_what_cannot_be_finished(tmp_path):
    url = sqlite_url(tmp_path / "runlog.sqlite")
    log = RunLog(url)
    with pytest.raises(NothingToRerun, match="no nightly run"):
        prepare_rerun(log, None)
    with pytest.raises(NoSuchRun):
        prepare_rerun(log, "no-such-run")
    done = log.start_run(kind="nightly", model="tiny", jobs_json=Night((FOX,), tmp_path).to_json())
    log.finish_run(done, status="ok")
    with pytest.raises(AlreadyDone):
        prepare_rerun(log, done)
    # A job that no longer passes the checks (here one that never did) stops it before any work.
    bad = _killed_night(url, Night((dataclasses.replace(FOX, height=33),), tmp_path))
    with pytest.raises(InvalidInput, match="`height`"):
        prepare_rerun(log, bad)


def test_cli_rerun_starts_the_flow_on_the_prepared_night(data_dir, monkeypatch):
    calls = []

    def fake_flow(**kwargs):
        calls.append(kwargs)
        return {"run_id": "new", "clips": {"fox": "/clips/fox.mp4"}, "failed": {}}

    monkeypatch.setattr(flows.rerun, "rerun", fake_flow)
    run_id = _killed_night(sqlite_url(data_dir / "runlog.sqlite"), Night((FOX,), data_dir / "outputs"))

    result = runner.invoke(app, ["rerun", "--last"])

    assert result.exit_code == 0, result.output
    assert calls == [{"run_id": run_id}]
    assert result.stdout.splitlines()[0] == f"run new (re-run of {run_id}): 1 clip(s), 0 failed"


# --- nothing is written where it should not be ----------------------------------------------------


def test_reading_commands_create_nothing_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("T2V_DATA_DIR", "T2V_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)

    table = runner.invoke(app, ["runs"])
    as_json = runner.invoke(app, ["runs", "--json"])
    helped = [runner.invoke(app, [name, "--help"]) for name in COMMANDS]

    assert table.exit_code == 0 and table.stdout == "no runs yet\n", table.output
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []
    assert all(result.exit_code == 0 for result in helped)
    assert list(tmp_path.iterdir()) == []


def _generate_args(*extra: str) -> list[str]:
    return [
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
        *extra,
    ]


def test_generate_names_each_clip_by_its_key_and_passes_that_path(data_dir, monkeypatch):
    from t2v_cli.checks import clip_key

    calls = []
    monkeypatch.setattr(flows.generate, "generate", lambda job, **kw: calls.append((job, kw)) or kw["out"])

    first = runner.invoke(app, _generate_args())
    other = runner.invoke(app, _generate_args("--seed", "1"))

    assert first.exit_code == 0 and other.exit_code == 0, first.output + other.output
    (job, kwargs), (other_job, _) = calls
    key = clip_key(dataclasses.replace(job, template="a-red-fox"), resolve_model("tiny"), fp8=False)
    assert job.template == f"a-red-fox-{key[:8]}"
    assert kwargs["out"] == str(data_dir / "outputs" / "generate" / f"{job.template}.mp4")
    assert first.stdout.strip() == kwargs["out"]
    assert other_job.template.startswith("a-red-fox-") and other_job.template != job.template


def test_generate_replaces_another_file_only_with_force(data_dir, tmp_path):
    made = runner.invoke(app, _generate_args())
    assert made.exit_code == 0, made.output
    clip = Path(made.stdout.strip())
    good = clip.read_bytes()

    again = runner.invoke(app, _generate_args())  # the same clip made again is not an overwrite
    assert again.exit_code == 0 and again.stdout == made.stdout, again.output

    clip.write_bytes(b"someone else's file")
    refused = runner.invoke(app, _generate_args())
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: the clip's path '{clip}' already exists and is not known to be this clip; "
        "pass --force to replace it, or choose another path."
    ]
    assert clip.read_bytes() == b"someone else's file"

    out = tmp_path / "mine.mp4"
    out.write_bytes(b"mine")
    refused_out = runner.invoke(app, _generate_args("--out", str(out)))
    assert refused_out.exit_code == 2 and "`--out`" in refused_out.stderr and out.read_bytes() == b"mine"

    forced = runner.invoke(app, _generate_args("--force", "--out", str(out)))
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes() == good and clip.read_bytes() == good
