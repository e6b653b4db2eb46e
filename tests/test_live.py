"""Watching a night as it runs: the progress slot and the recorder's thread, the run-log rows they write,
the dashboard's live JSON, a killed night shown interrupted at its last step, and a real tiny night
watched in Chromium while it runs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, func, select
from test_crash import _catalogue, _nightly, _wait_for
from test_dashboard import CHROMIUM, require, serve  # noqa: F401 - serve is a fixture
from test_postgres import pg_url  # noqa: F401 - a fixture

from t2v.dashboard import Dashboard, live
from t2v.engine import live as recorder
from t2v.engine.hooks import Event, Hooks
from t2v.pipeline import PIPELINE
from t2v.pipeline.decode import decoder_passes
from t2v.runlog import RunLog, sqlite_url
from t2v.runlog import live as rows
from t2v.runlog.schema import Run, TimelineChunk
from t2v.runlog.sweep import HEARTBEAT_LOST_S
from t2v.store import Store

NAMES = [s.name for s in PIPELINE]
SCREENSHOT_RUNNING = Path("/tmp/t2v-dashboard-live-running.png")
SCREENSHOT_DONE = Path("/tmp/t2v-dashboard-live-done.png")


class FakeProbe:
    """Memory figures that grow by one each read, so a test can tell samples apart."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> tuple[float | None, float | None, float | None, float | None]:
        self.reads += 1
        return None, float(self.reads), 0.5, None

    def close(self) -> None:
        pass


class _Stage:
    def __init__(self, name: str) -> None:
        self.name = name


class _Job:
    def __init__(self, template: str) -> None:
        self.template = template


@pytest.fixture
def log(tmp_path: Path) -> RunLog:
    return RunLog(sqlite_url(tmp_path / "runlog.sqlite"))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


# --- the slot, the recorder and the rows --------------------------------------------------------------


def test_the_slot_keeps_the_latest_step_and_a_failed_write_gives_back_only_older_ones():
    slot = recorder.ProgressSlot()
    for step in range(1, 1001):
        slot.note("fox", "diffuse", step, 1000)
    slot.note("owl", "encode", 1, 2)
    taken = slot.take()
    assert taken == {("fox", "diffuse"): (1000, 1000), ("owl", "encode"): (1, 2)}
    assert slot.take() == {}
    slot.note("owl", "encode", 2, 2)  # newer than what the failed write held
    slot.put_back(taken)
    assert slot.take() == {("fox", "diffuse"): (1000, 1000), ("owl", "encode"): (2, 2)}


def test_the_recorder_writes_at_most_once_an_interval_and_its_last_figures_at_the_end(log, monkeypatch):
    monkeypatch.setattr(recorder, "CHUNK_SAMPLES", 4)  # several chunk rows from a short record
    run_id = log.start_run(kind="nightly", model="tiny")
    probe = FakeProbe()
    record = recorder.LiveRecorder(log, run_id, "cpu", interval_s=0.1, probe=lambda: probe)
    hooks = record.hooks()
    stage, job = _Stage("diffuse"), _Job("fox")
    writes = []
    real = log.record_live
    monkeypatch.setattr(log, "record_live", lambda *a, **k: (writes.append(time.monotonic()), real(*a, **k)))

    t0 = time.monotonic()
    with record:
        for step in range(1, 3001):  # thousands of reports: the run log hears of a few
            hooks.progress(stage, job, step, 3000)
            if step % 1000 == 0:
                time.sleep(0.2)
        # A compute boundary wakes the thread for a sample of its own, not for a write.
        hooks.on_event[0](Event("compute", "start", "decode", "fox", None, time.perf_counter()))
        time.sleep(0.25)
    elapsed = time.monotonic() - t0

    assert len(writes) <= elapsed / 0.1 + 2
    assert all(b - a >= 0.1 * 0.45 for a, b in zip(writes, writes[1:], strict=False))
    progress = log.progress([run_id])[run_id]
    assert [(p["template"], p["stage"], p["step"], p["steps"]) for p in progress] == [
        ("fox", "diffuse", 3000, 3000),
        ("fox", "decode", 0, None),  # shown as started, before it counts anything
    ]
    samples = log.timeline(run_id)
    assert len(samples) == probe.reads > len(writes)  # every sample stored, boundary ones included
    assert [s[2] for s in samples] == [float(i) for i in range(1, probe.reads + 1)]
    assert all(s[1] is None and s[4] is None and s[3] == 0.5 for s in samples)
    assert [s[0] for s in samples] == sorted(s[0] for s in samples)
    started = datetime.fromisoformat(log.run(run_id)["started"]).timestamp()
    assert 0 <= samples[0][0] < samples[-1][0] <= time.time() - started
    engine = create_engine(log.url)
    with engine.connect() as conn:  # packed four to a row, each row written in place
        chunks = conn.execute(select(func.count()).select_from(TimelineChunk)).scalar()
        heartbeat = conn.execute(select(Run.heartbeat).where(Run.id == run_id)).scalar()
    engine.dispose()
    assert chunks == -(-len(samples) // 4) and heartbeat is not None


def test_the_recorder_outlasts_a_run_log_that_fails_and_writes_what_it_missed(log, monkeypatch, caplog):
    run_id = log.start_run(kind="nightly", model="tiny")
    record = recorder.LiveRecorder(log, run_id, "cpu", interval_s=0.05, probe=FakeProbe)
    real, failures = log.record_live, []

    def flaky(*args, **kwargs):
        if len(failures) < 3:
            failures.append(1)
            raise OSError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(log, "record_live", flaky)
    with record:
        record.hooks().progress(_Stage("encode"), _Job("fox"), 1, 2)
        time.sleep(0.4)
    assert log.progress([run_id])[run_id][0]["step"] == 1
    assert len(log.timeline(run_id)) >= 5
    assert sum("cannot write to the run log" in r.message for r in caplog.records) == 1


def test_samples_pack_to_twenty_bytes_and_unmeasured_figures_come_back_none():
    samples = [(0.5, None, 1.25, 2.0, None), (1.5, 3.0, None, 2.5, 4.0)]
    blob = rows.pack(samples)
    assert len(blob) == 20 * len(samples)
    assert rows.unpack(blob) == samples


def test_the_memory_probe_on_a_cpu_reads_the_host_only():
    probe = recorder.MemoryProbe("cpu")
    nvml, reserved, rss, cgroup = probe.read()
    probe.close()
    assert (nvml, reserved) == (None, None)
    assert 0 < rss < 1024 and (cgroup is None or cgroup > 0)


def test_decoder_passes_are_what_the_vae_runs_whole_and_tiled():
    from t2v.models import tiny

    vae = tiny.build_vae().eval()
    z = torch.randn(1, vae.config.z_dim, 3, 8, 14)
    for tile in (None, 64):
        if tile:
            vae.enable_tiling(
                tile_sample_min_height=tile,
                tile_sample_min_width=tile,
                tile_sample_stride_height=48,
                tile_sample_stride_width=48,
            )
        calls: list[int] = []
        handle = vae.decoder.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        with torch.no_grad():
            vae.decode(z)
        handle.remove()
        assert len(calls) == decoder_passes(vae, tuple(z.shape)) == (3 if tile is None else 3 * 3 * 5)


def test_every_card_stage_reports_its_steps_through_the_hooks(tmp_path):
    from test_resume import JOB, _runner

    seen: list[tuple[str, int, int | None]] = []
    hooks = Hooks(on_progress=(lambda stage, job, done, total: seen.append((stage.name, done, total)),))
    runner = _runner(tmp_path / "night", hooks=hooks)
    for stage in PIPELINE[:3]:
        runner.run(stage, JOB)
    by_stage = {name: [(d, t) for s, d, t in seen if s == name] for name in NAMES[:3]}
    assert by_stage["encode"] == [(0, 2), (1, 2), (2, 2)]  # prompt and negative prompt
    assert by_stage["diffuse"] == [(i, JOB.steps) for i in range(JOB.steps + 1)]
    assert by_stage["decode"] == [(i, 3) for i in range(4)]  # 9 frames are 3 latent frames


def test_the_live_rows_on_postgres(pg_url):  # noqa: F811
    log = RunLog(pg_url)
    run_id = log.start_run(kind="nightly", model="tiny")
    samples = [(0.5, None, 1.25, 2.0, None), (1.5, 3.0, None, 2.5, 4.0)]
    log.record_live(run_id, progress={("fox", "diffuse"): (1, 20)}, chunks=[(0, rows.pack(samples[:1]))])
    log.record_live(run_id, progress={("fox", "diffuse"): (2, 20)}, chunks=[(0, rows.pack(samples))])
    (row,) = log.progress([run_id])[run_id]  # updated in place, one row per job and stage
    assert (row["step"], row["steps"]) == (2, 20)
    assert log.timeline(run_id) == samples and log.run(run_id)["heartbeat"] is not None
    log.close()


# --- what the dashboard makes of it -----------------------------------------------------------------


def _row(template, stage, status="ok", start=0.0, end=1.0, plan=None, wall=None):
    base = datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    return {
        "template": template,
        "stage": stage,
        "status": status,
        "plan": plan,
        "attempt": 1,
        "started": (base + timedelta(seconds=start)).isoformat(),
        "finished": None if status == "running" else (base + timedelta(seconds=end)).isoformat(),
        "wall_s": None if status == "running" else (wall if wall is not None else end - start),
    }


def _night(stages, status="running", **fields):
    jobs = {"jobs": [{"template": "fox"}, {"template": "owl"}]}
    run = {"id": "r", "status": status, "started": "2026-12-02T02:00:00+00:00", "finished": None}
    return run | {"stages": stages, "jobs_json": json.dumps(jobs), "heartbeat": None} | fields


def test_the_estimate_goes_by_tonights_costs_the_running_rows_pace_and_earlier_nights():
    now = datetime(2026, 12, 2, 2, 0, 50, tzinfo=UTC)
    run = _night(
        [
            _row("fox", "encode", end=4),
            _row("owl", "encode", start=4, end=6),  # encode costs 3 s a job tonight
            _row("fox", "diffuse", start=6, end=36),  # diffuse 30 s
            _row("owl", "diffuse", "running", start=36),  # 14 s so far at 7 of 10 steps: 6 s left
        ]
    )
    progress = [{"template": "owl", "stage": "diffuse", "step": 7, "steps": 10}]
    assert live.estimate(run, progress, {}, now)["remaining_s"] is None  # decode: nothing to go by yet
    known = {"decode": 5.0, "finish": 2.0, "encode": 99.0}
    got = live.estimate(run, progress, known, now)
    # 6 s of owl's diffusion, two decodes of 5 s, and one finish after the last (the other overlaps).
    assert got["elapsed_s"] == 50 and got["remaining_s"] == pytest.approx(6 + 10 + 2)
    assert got["ends_at"] == (now + timedelta(seconds=18)).isoformat()
    jobs = live.jobs_now(run, progress)
    assert [(j["template"], j["stage"], j["step"], j["steps"], j["state"]) for j in jobs] == [
        ("fox", "decode", None, None, "waiting"),
        ("owl", "diffuse", 7, 10, "running"),
    ]
    # A failed job's later stages never run; a finished night has no estimate and no live view.
    failed = _night([*run["stages"][:2], _row("fox", "diffuse", "failed", start=6, end=7), run["stages"][3]])
    assert live.estimate(failed, progress, known, now)["remaining_s"] == pytest.approx(6 + 5 + 2)
    assert live.view(run | {"status": "ok"}, progress) is None
    earlier = _night([_row("fox", "decode", wall=4.0), _row("owl", "decode", wall=6.0)], status="ok")
    assert live.history([earlier | {"started": "2026-12-01T02:00:00+00:00"}], before=run["started"]) == {
        "decode": 5.0
    }


def test_the_timeline_keeps_its_peaks_when_thinned_and_marks_the_stage_in_force():
    samples = [(float(t), None, 1.0 + (t == 1234), 2.0, None) for t in range(5000)]
    points = live.timeline(samples, max_points=1000)
    assert len(points) == 1000 and points[1]["t_s"] == 5.0
    assert max(p["reserved_gib"] for p in points) == 2.0 and points[0]["nvml_gib"] is None
    run = _night(
        [
            _row("fox", "encode", "skipped", end=0),
            _row("fox", "diffuse", start=1000, end=2000, plan="diffuse:cpu-cfg2"),
            _row("owl", "diffuse", "running", start=2000),
        ]
    )
    marked = live.segments(run, samples)
    assert [(m["stage"], m["template"], m["start_s"], m["end_s"]) for m in marked] == [
        ("diffuse", "fox", 1000.0, 2000.0),
        ("diffuse", "owl", 2000.0, 4999.0),  # still open: up to the last sample
    ]
    (reserved, rss) = live.peaks(samples, marked)
    assert (reserved["field"], reserved["gib"], reserved["t_s"]) == ("reserved_gib", 2.0, 1234.0)
    assert reserved["during"] == [{"template": "fox", "stage": "diffuse", "plan": "diffuse:cpu-cfg2"}]
    assert rss["field"] == "rss_gib"


def test_a_silent_night_on_another_host_is_interrupted_at_its_last_heartbeat(log):
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    run_id = log.start_run(kind="nightly", model="tiny")
    quiet = log.start_run(kind="nightly", model="tiny")
    old = datetime.now(UTC) - timedelta(seconds=HEARTBEAT_LOST_S + 30)
    engine = create_engine(log.url)
    with log.stage(run_id=run_id, job_key="k", template="fox", stage="diffuse", model="tiny"):
        log.record_live(run_id, progress={("fox", "diffuse"): (7, 20)})
        log.record_live(quiet, progress={})
        with Session(engine) as session, session.begin():  # both on another host; one silent for long
            session.execute(update(Run).values(host="gpu-7", pid=1))
            session.execute(update(Run).where(Run.id == run_id).values(heartbeat=old))
        assert log.mark_interrupted() == 1
        run = log.run(run_id)
        assert (run["status"], run["stages"][0]["status"]) == ("interrupted", "interrupted")
        assert datetime.fromisoformat(run["finished"]) == old  # it ended when it was last heard from
        assert log.run(quiet)["status"] == "running"  # heard from just now
    engine.dispose()


# --- a killed night, and a night watched in Chromium ----------------------------------------------------


def test_a_killed_night_shows_interrupted_at_its_last_step(data_dir, tmp_path, serve, monkeypatch):  # noqa: F811
    from t2v.dashboard import server

    monkeypatch.setattr(server, "SWEEP_S", 0.0)  # every request looks for dead processes
    catalogue = _catalogue(tmp_path / "night", "fox")
    catalogue.write_text(catalogue.read_text().replace("steps = 2", "steps = 8"))
    proc = _nightly(data_dir, catalogue, T2V_PAUSE_AT="diffuse@3")
    _wait_for(data_dir / "paused-at-diffuse@3", proc)
    runlog = RunLog(sqlite_url(data_dir / "runlog.sqlite"))
    run_id = runlog.last_run_id()
    deadline = time.monotonic() + 10
    while not any(p["step"] == 3 for p in runlog.progress([run_id])[run_id]) and time.monotonic() < deadline:
        time.sleep(0.1)  # the recorder writes within a second of the step
    base = serve(Dashboard(runlog=runlog, store=Store(data_dir / "store")))
    assert _get(f"{base}/api/nights/{run_id}")["status"] == "running"  # alive, if paused

    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    night = _get(f"{base}/api/nights/{run_id}")
    assert night["status"] == "interrupted"
    assert {"template": "fox", "stage": "diffuse", "step": 3, "steps": 8} in [
        {k: p[k] for k in ("template", "stage", "step", "steps")} for p in night["progress"]
    ]
    (fox,) = night["live"]["jobs"]
    assert (fox["stage"], fox["step"], fox["steps"], fox["state"]) == ("diffuse", 3, 8, "interrupted")
    assert night["live"]["remaining_s"] is None and night["timeline"]
    assert _get(f"{base}/api/nights")["nights"][0]["status"] == "interrupted"


def paced_steps() -> Hooks:
    """$T2V_HOOKS of the watched night: 15 ms after each denoising step, so that a diffusion lasts a few
    seconds on any machine and the page sees its steps grow (the tiny model takes ~1 ms a step)."""
    return Hooks(on_step=(lambda stage, job, done: time.sleep(0.015),))


def test_a_night_watched_in_chromium_as_it_runs(data_dir, write_catalogue, serve, monkeypatch):  # noqa: F811
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed")
    from flows.nightly import nightly

    # An earlier night, so that the watched one has an estimate before each of its stages has run.
    first = write_catalogue({"name": "kite", "prompt": "a kite over a beach", "seed": 9})
    assert nightly(str(first), "tiny")["failed"] == {}
    catalogue = write_catalogue(
        {"name": "fox", "prompt": "a red fox running through snow", "seed": 1},
        {"name": "owl", "prompt": "an owl on a branch at night", "seed": 2},
        steps=200,
    )
    monkeypatch.setenv("T2V_HOOKS", "test_live:paced_steps")
    runlog = RunLog(sqlite_url(data_dir / "runlog.sqlite"))
    base = serve(Dashboard(runlog=runlog, store=Store(data_dir / "store")))
    result: dict = {}
    night = threading.Thread(target=lambda: result.update(nightly(str(catalogue), "tiny")), daemon=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--headless", "--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100}, bypass_csp=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            night.start()
            deadline = time.monotonic() + 30
            while not [r for r in runlog.runs(limit=1) if r["status"] == "running"]:
                assert time.monotonic() < deadline and night.is_alive(), result
                time.sleep(0.05)
            page.goto(base)  # the newest night is the one shown, and the page polls it by itself
            shown = "window.t2v.night && window.t2v.night.status === 'running'"
            page.wait_for_function(f"{shown} && !document.getElementById('live').hidden", timeout=30_000)
            seen, estimates = [], set()
            while night.is_alive() and len(seen) < 400:
                cells = page.locator("#live-jobs tbody tr").evaluate_all(
                    "rows => rows.map(r => [...r.children].map(c => c.textContent))"
                )
                seen += [(c[0], c[1], c[2], c[4]) for c in cells if c[4] == "running"]
                if len(seen) == 8:
                    page.screenshot(path=str(SCREENSHOT_RUNNING), full_page=True)
                estimates.add("ends about" in page.locator("#live-meta").inner_text())
                time.sleep(0.25)
            night.join(timeout=120)
            diffusing = [int(step.split("/")[0]) for t, stage, step, _ in seen if stage == "diffuse" and step]
            assert len(set(diffusing)) >= 3, seen  # the page showed the step count grow...
            assert all(step.endswith("/200") for _, stage, step, _ in seen if stage == "diffuse" and step)
            for template in ("fox", "owl"):
                mine = [
                    int(s.split("/")[0]) for t, st, s, _ in seen if t == template and st == "diffuse" and s
                ]
                assert mine == sorted(mine), seen  # ...and never go back
            assert True in estimates

            # Finished: the page says so by itself, and the timeline has samples in every stage.
            assert result["failed"] == {}
            page.wait_for_function("window.t2v.night.status === 'ok'", timeout=20_000)
            assert page.locator("#live").is_hidden()
            timeline = page.evaluate("() => window.t2v.timeline")
            times = [point["t_s"] for point in timeline["points"]]
            assert [band["stage"] for band in timeline["bands"]] == NAMES
            for band in timeline["bands"]:
                assert any(band["start_s"] <= t <= band["end_s"] for t in times), band
            assert all(point["rss_gib"] > 0 and point["nvml_gib"] is None for point in timeline["points"])
            drawn = page.evaluate("() => window.t2v.charts['timeline-chart'].data.datasets.map(d => d.label)")
            assert "host RSS" in drawn and "card used (NVML)" not in drawn  # a CPU night: no card lines
            assert "peak host RSS" in page.locator("#timeline-peaks").inner_text()
            page.screenshot(path=str(SCREENSHOT_DONE), full_page=True)
            assert errors == []
        finally:
            browser.close()
            night.join(timeout=120)
