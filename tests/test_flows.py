"""The nightly and generate flows on the built-in tiny model, against the session's Prefect test server."""

from datetime import date
from fractions import Fraction
from pathlib import Path

import av
import pytest

from flows.generate import generate
from flows.nightly import nightly
from t2v.context import RunContext
from t2v.jobs import JobSpec
from t2v.pipeline import PIPELINE
from t2v.runlog import RunLog, sqlite_url
from t2v.settings import get_settings
from tasks.stages import TASKS

STAGES = [stage.name for stage in PIPELINE]
FOX = {"name": "fox", "prompt": "a red fox running through snow"}
SEA = {
    "name": "sea",
    "prompt": "waves rolling onto a beach",
    "guidance": 1.0,
    "steps": 3,
    "height": 96,
    "width": 64,
    "frames": 13,
    "fps": 12,
}


def _runlog(data_dir: Path) -> RunLog:
    return RunLog(sqlite_url(data_dir / "runlog.sqlite"))


def _video(path: Path) -> tuple[str, int, int, int, Fraction]:
    """(codec, width, height, frame count, frame rate) as PyAV reads the file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.width, stream.height, frames, stream.average_rate


def _rows(run: dict, template: str) -> list[tuple[str, str, str | None]]:
    return [(r["stage"], r["status"], r["plan"]) for r in run["stages"] if r["template"] == template]


def _store_files(data_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (data_dir / "store").rglob("*") if p.is_file()}


def test_nightly_makes_every_clip_then_skips_every_stage(data_dir, write_catalogue):
    catalogue = write_catalogue(FOX, SEA)

    summary = nightly(str(catalogue), "tiny")

    outputs = data_dir / "outputs" / date.today().isoformat()
    assert summary["failed"] == {}
    assert summary["clips"] == {"fox": str(outputs / "fox.mp4"), "sea": str(outputs / "sea.mp4")}
    assert _video(outputs / "fox.mp4") == ("h264", 96, 64, 9, 24)
    assert _video(outputs / "sea.mp4") == ("h264", 64, 96, 13, 12)
    run = _runlog(data_dir).run(summary["run_id"])
    assert (run["kind"], run["status"]) == ("nightly", "ok")
    for template in ("fox", "sea"):
        rows = [r for r in run["stages"] if r["template"] == template]
        assert [r["stage"] for r in rows] == STAGES
        assert all(r["status"] == "ok" and r["wall_s"] > 0 and r["peak_rss_gib"] > 0 for r in rows)
    # Stage-major on the card: every encode before any diffusion, every diffusion before any decode;
    # a job's clip is encoded once its frames are, beside the other job's decode.
    order = [(r["stage"], r["template"]) for r in run["stages"]]
    assert [stage for stage, _ in order[:4]] == ["encode", "encode", "diffuse", "diffuse"]
    assert {stage for stage, _ in order[4:]} == {"decode", "finish"}
    assert all(order.index(("decode", t)) < order.index(("finish", t)) for t in ("fox", "sea"))

    stored = _store_files(data_dir)
    again = nightly(str(catalogue), "tiny")

    assert again["failed"] == {} and again["clips"] == summary["clips"]
    run = _runlog(data_dir).run(again["run_id"])
    assert run["status"] == "ok"
    rows = [(r["stage"], r["status"]) for r in run["stages"]]
    assert sorted(rows, key=lambda r: STAGES.index(r[0])) == [(s, "skipped") for s in STAGES for _ in "ab"]
    assert _store_files(data_dir) == stored


def test_nightly_falls_back_to_a_leaner_plan_on_out_of_memory(data_dir, write_catalogue, monkeypatch):
    monkeypatch.setenv("T2V_INJECT_OOM", "diffuse:cpu-cfg2")
    catalogue = write_catalogue(FOX, {"name": "owl", "prompt": "an owl blinking at night", "seed": 7})

    summary = nightly(str(catalogue), "tiny")

    assert summary["failed"] == {}
    assert set(summary["clips"]) == {"fox", "owl"}
    run = _runlog(data_dir).run(summary["run_id"])
    assert run["status"] == "ok"
    for template in ("fox", "owl"):
        assert _rows(run, template) == [
            ("encode", "ok", "encode:cpu"),
            ("diffuse", "failed", "diffuse:cpu-cfg2"),  # refused before it chose its attention kernel
            ("diffuse", "ok", "diffuse:cpu-cfg1-attn-sdpa"),
            ("decode", "ok", "decode:cpu-fp32-whole"),
            ("finish", "ok", None),
        ]
        failed = next(r for r in run["stages"] if r["template"] == template and r["status"] == "failed")
        assert failed["error"].startswith("OutOfMemoryError: injected by T2V_INJECT_OOM")
        assert Path(summary["clips"][template]).is_file()


def test_a_job_out_of_memory_on_every_plan_fails_and_others_finish(data_dir, write_catalogue, monkeypatch):
    # `template/stage:plan` aims at one job: fox's diffusion has two CPU plans and both run out.
    monkeypatch.setenv("T2V_INJECT_OOM", "fox/diffuse:*")
    catalogue = write_catalogue(FOX, SEA)

    summary = nightly(str(catalogue), "tiny")

    assert set(summary["clips"]) == {"sea"}
    assert list(summary["failed"]) == ["fox"]
    assert summary["failed"]["fox"].startswith(
        "diffuse: NoPlanFits: diffuse of 'fox' ran out of memory on every plan "
        "(diffuse:cpu-cfg2, diffuse:cpu-cfg1)"
    )
    run = _runlog(data_dir).run(summary["run_id"])
    assert run["status"] == "failed"
    assert _rows(run, "fox") == [
        ("encode", "ok", "encode:cpu"),
        ("diffuse", "failed", "diffuse:cpu-cfg2"),
        ("diffuse", "failed", "diffuse:cpu-cfg1"),
    ]
    for row in [r for r in run["stages"] if r["status"] == "failed"]:
        # Each failed attempt keeps its error and what it used before failing: the next plan must beat it.
        assert row["error"].startswith("OutOfMemoryError: injected by T2V_INJECT_OOM")
        assert row["peak_rss_gib"] > 0 and row["finished"] is not None
    assert [stage for stage, status, _ in _rows(run, "sea") if status == "ok"] == STAGES
    assert _video(Path(summary["clips"]["sea"]))[0] == "h264"
    assert not (data_dir / "outputs" / date.today().isoformat() / "fox.mp4").exists()


def test_generate_makes_one_clip_at_out(data_dir, tmp_path):
    job = JobSpec(
        template="fox", prompt="a red fox running through snow", height=64, width=96, frames=5, steps=2, fps=8
    )
    out = tmp_path / "clips" / "Fox Clip.mp4"

    clip = generate(job, model="tiny", out=str(out))

    assert clip == str(out)
    assert _video(out) == ("h264", 96, 64, 5, 8)
    run = _runlog(data_dir).runs(limit=1)[0]
    assert (run["kind"], run["status"]) == ("generate", "ok")
    assert [(r["stage"], r["status"]) for r in run["stages"]] == [(s, "ok") for s in STAGES]
    assert (data_dir / "outputs" / "generate" / "fox.mp4").is_file()


def test_generate_fails_and_logs_the_run_failed(data_dir, monkeypatch):
    monkeypatch.setenv("T2V_INJECT_OOM", "decode:*")
    job = JobSpec(template="fox", prompt="a red fox", height=64, width=64, frames=5, steps=1)

    with pytest.raises(Exception, match="decode of 'fox' ran out of memory on every plan"):
        generate(job, model="tiny")

    run = _runlog(data_dir).runs(limit=1)[0]
    assert (run["kind"], run["status"]) == ("generate", "failed")
    assert [(r["stage"], r["status"]) for r in run["stages"]] == [
        ("encode", "ok"),
        ("diffuse", "ok"),
        ("decode", "failed"),
    ]


def test_stage_tasks_return_strings(data_dir):
    # `.fn` runs a task's body without the Prefect engine.
    url = sqlite_url(data_dir / "runlog.sqlite")
    run_id = RunLog(url).start_run(kind="generate", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=data_dir / "out", settings=get_settings())
    job = JobSpec(template="owl", prompt="an owl", height=32, width=32, frames=1, steps=1)

    *keys, clip = [TASKS[stage.name].fn(job, ctx) for stage in PIPELINE]

    assert all(isinstance(key, str) and len(key) == 32 for key in keys)
    assert clip == str(data_dir / "out" / "owl.mp4") and Path(clip).is_file()
