"""The GPU benchmarks, run on this CPU with the built-in model: the scripts that produce
docs/benchmarks.md's throughput figures must keep running, and what they count must add up.

Both start a real `prefect server start` (and the second, real workers), so they run only with
T2V_TEST_DEPLOYMENT=1, which `.ci/run` sets.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect_server import require_slow_tests

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "T2V_"))}
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")]
        + list(args),
        cwd=REPO,
        env=env | {"DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads((out / f"{script}.json").read_text())


def test_nightly_throughput_runs_both_sides_and_accounts_for_the_wall_time(tmp_path):
    require_slow_tests("a real Prefect server, our night and the diffusers loop")
    args = ("--jobs", "3", "--steps", "2", "--skip", "compile")
    results = _run("nightly_throughput", *args, tmp_path=tmp_path)

    ours, baseline = results["phases"]["ours"], results["phases"]["baseline"]
    assert (ours["clips"], baseline["clips"], ours["failed"]) == (3, 3, {})
    assert {(r["stage"], r["status"]) for r in ours["rows"]} == {
        (s, "ok") for s in ("encode", "diffuse", "decode", "watermark")
    }
    calls = ours["calls"]
    # One compute call per job and stage; the shared negative prompt is encoded once.
    assert (calls["encode"], calls["denoise"], calls["decode"]) == (4, 3, 3)
    assert calls["runner_diffuse"] == calls["stage_diffuse"] * 3 == 3
    split = results["ours_overhead_s"]
    compute = sum(ours["compute_s"][k] for k in ("encode", "denoise", "decode"))
    parts = compute + sum(split.values())
    tails = {f"{stage}_tail" for stage in ("encode", "diffuse", "decode", "watermark")}
    assert set(split) == {"loads", "compile", "prefect_and_flow"} | tails
    assert abs(parts - ours["wall_s"]) < 1e-6 * ours["wall_s"] + 1e-9
    assert split["compile"] == 0  # a CPU run does not compile
    assert all(part > 0 for name, part in split.items() if name != "compile")
    # The card's timeline: each stage's jobs held the card once each, inside the stage's span.
    for stage, timeline in results["card_timeline_s"].items():
        assert timeline["holds"] == 3, stage
        inside = timeline["before_first_hold_s"] + timeline["gaps_s"] + timeline["after_last_hold_s"]
        assert 0 <= inside < timeline["span_s"]
    # The three components were read into host memory in the background, each while the stage before ran.
    assert calls["prefetch"] == 3 and results["prefetch_s"] > 0
    assert 0 < results["ours_overhead_share"] < 1
    per_hour = results["ours_clips_per_hour"], results["baseline_clips_per_hour"]
    assert results["ratio"] == pytest.approx(per_hour[0] / per_hour[1])
    cache = results["phases"]["cache"]
    assert cache["uncached_matches_night"] == 0  # the same job, seed and plan: the night's latents


def test_multi_gpu_splits_the_night_between_workers_with_no_job_twice(tmp_path):
    require_slow_tests("a real Prefect server and three workers")
    # As two calls, the way a night too long for one device command is measured: the second merges.
    first = _run("multi_gpu", "--jobs", "3", "--steps", "2", "--phases", "one", tmp_path=tmp_path)
    assert "two" not in first and "scaling_wall" not in first
    results = _run("multi_gpu", "--jobs", "3", "--steps", "2", "--phases", "two", tmp_path=tmp_path)
    assert results["one"] == first["one"]

    one, two = results["one"], results["two"]
    assert one["completed"] and two["completed"] and results["no_job_twice"]
    assert one["clips"] == two["clips"] == 3
    templates = sorted(results["templates"])
    assert sorted(one["split"]["gpu0"]) == templates
    made = [t for worker in ("gpu0", "gpu1") for t in two["split"][worker]]
    assert sorted(made) == templates and all(two["split"][w] for w in ("gpu0", "gpu1"))
    assert results["scaling_wall"] == pytest.approx(one["wall_s"] / two["wall_s"])  # same clips in each


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "nightly_throughput", REPO / "bench" / "nightly_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_first_compiled_job_s_excess_over_the_later_ones_is_counted_as_compile():
    bench = _bench_module()
    events = [
        ("denoise", "t", start, start + took)
        for start, took in ((0, 30.0), (40, 14.0), (60, 14.5), (80, 13.9))
    ]
    ours = {"compute_s": {"compile_call": 0.5}, "calls": {"compile_call": 1}, "events": events}
    assert bench.compile_seconds(ours) == {"call": 0.5, "first_steps": 16.0, "total": 16.5}
    ours["calls"] = {}  # a night that did not compile: its first job is just a job
    assert bench.compile_seconds(ours)["total"] == 0.5 and bench.compile_seconds(ours)["first_steps"] == 0


def test_the_card_timeline_splits_a_stage_around_its_holds():
    bench = _bench_module()
    events = [
        ("stage_decode", "main", 10.0, 30.0),
        ("card", "a", 12.0, 17.0),
        ("decode", "a", 12.5, 16.5),
        ("card", "b", 18.0, 25.0),
        ("decode", "b", 18.0, 24.0),
    ]
    timeline = bench.card_timeline(events)["decode"]
    assert timeline == pytest.approx(
        {
            "span_s": 20.0,
            "holds": 2,
            "before_first_hold_s": 2.0,
            "gaps_s": 1.0,
            "held_not_compute_s": 2.0,
            "after_last_hold_s": 5.0,
        }
    )
