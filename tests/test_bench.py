"""The GPU benchmarks, run on this CPU with the built-in model: the scripts that produce
docs/benchmarks.md's throughput figures must keep running, and what they count must add up. They
measure through the hooks the runner offers (its events, codec and loader), never by patching library
functions, and no function of theirs grows past 80 lines.

The two script runs use the session's Prefect test server (`--prefect-api`) rather than starting
their own, and the second starts real workers on it, so they run only with T2V_TEST_DEPLOYMENT=1, which
`.ci/run` sets.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prefect_server import require_slow_tests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.night import GPU_MACHINE_HOOKS, NpyCodec  # noqa: E402
from bench.summary import summarise  # noqa: E402
from bench.timeline import Timeline, card_timeline, compile_seconds, label  # noqa: E402
from t2v.engine.hooks import Event, hooks_from  # noqa: E402
from t2v.pipeline import CLIP, decode, diffuse, encode, stages  # noqa: E402

BENCH_FILES = sorted((REPO / "bench").glob("*.py"))
MAX_FUNCTION_LINES = 80


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    """`bench/<script>.py --tiny` against the session's Prefect server; its results file."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "T2V_"))}
    out = tmp_path / "out"
    server = ["--prefect-api", PREFECT_API_URL.value()]
    done = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")]
        + [*server, *args],
        cwd=REPO,
        env=env | {"DO_NOT_TRACK": "1", "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads((out / f"{script}.json").read_text())


def test_nightly_throughput_runs_both_sides_and_accounts_for_the_wall_time(tmp_path):
    require_slow_tests("our night through Prefect and the diffusers loop")
    args = ("--jobs", "3", "--steps", "2", "--skip", "compile")
    results = _run("nightly_throughput", *args, tmp_path=tmp_path)

    ours, baseline = results["phases"]["ours"], results["phases"]["baseline"]
    assert (ours["clips"], baseline["clips"], ours["failed"]) == (3, 3, {})
    assert {(r["stage"], r["status"]) for r in ours["rows"]} == {(s.name, "ok") for s in stages()}
    calls = ours["calls"]
    card = [label(s) for s in stages() if s.on_card]
    # One compute per job and card stage (the runner's "compute" spans).
    assert [calls[name] for name in card] == [3, 3, 3]
    assert calls[f"runner_{label(diffuse.STAGE)}"] == calls[f"stage_{label(diffuse.STAGE)}"] * 3 == 3
    split = results["ours_overhead_s"]
    compute = sum(ours["compute_s"][name] for name in card)
    parts = compute + sum(split.values())
    tails = {f"{label(s)}_tail" for s in stages()}
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
    assert len(results["frames_mean_abs_diff_vs_baseline"]) == 3  # our frames, read back by the codec


@pytest.fixture
def night_deployed_on_the_session_server() -> Iterator[None]:
    """What bench/multi_gpu.py deploys on the session's server (its pool, the nightly deployment, the
    `gpu` limit) removed afterwards: the other tests run with no `gpu` limit (tests/test_tasks.py)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from bench.multi_gpu_phase import DEPLOYMENT, POOL
    from deployments.deploy import GPU_LIMIT

    yield
    with get_client(sync_client=True) as client:
        removals = (
            lambda: client.delete_deployment(client.read_deployment_by_name(DEPLOYMENT).id),
            lambda: client.delete_work_pool(POOL),
            lambda: client.delete_global_concurrency_limit_by_name(GPU_LIMIT),
        )
        for remove in removals:
            try:
                remove()
            except ObjectNotFound:
                pass


def test_multi_gpu_splits_the_night_between_workers_with_no_job_twice(
    tmp_path, night_deployed_on_the_session_server
):
    require_slow_tests("a Prefect deployment and two workers")
    from bench import multi_gpu

    # The second of two calls, the way a night too long for one device command is measured: it merges
    # the first's phase (here one this test writes for the same night) with its own. Both phases run
    # `multi_gpu_phase.run_phase`, one with one shard, the other with two.
    common = ("--jobs", "3", "--steps", "2", "--no-ffmpeg", "--no-import-probe")
    args = multi_gpu.parse_args(["--tiny", "--out", str(tmp_path / "out"), *common])
    one = dict(completed=True, no_job_twice=True, workers=1, clips=3, wall_s=30.0, clips_per_hour_wall=360.0)
    one |= {"split": {"gpu0": ["a", "b", "c"]}, "runs": []}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "multi_gpu.json").write_text(json.dumps(multi_gpu.night_header(args) | {"one": one}))
    results = _run("multi_gpu", *common, "--phases", "two", "--reuse-deployment", tmp_path=tmp_path)
    assert results["one"] == one and results["deployment"] == "deployed"

    two = results["two"]
    assert two["completed"] and results["no_job_twice"] and two["clips"] == 3
    templates = sorted(results["templates"])
    made = [t for worker in ("gpu0", "gpu1") for t in two["split"][worker]]
    assert sorted(made) == templates and all(two["split"][w] for w in ("gpu0", "gpu1"))
    assert results["scaling_wall"] == pytest.approx(two["clips_per_hour_wall"] / 360.0)
    assert two["outputs"]["npy_content"] == 3
    # A later call on this server (the session's, this process's) finds the night deployed as it is.
    assert multi_gpu.deployed_already(args, (tmp_path / "work").resolve() / "night.toml")


def _few_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict:
    """bench/few_step.py --tiny in this process (it drives the StageRunner itself: no Prefect, and no
    new process to import torch and diffusers again); its results file."""
    from bench import few_step

    monkeypatch.setenv("T2V_DATA_DIR", str(tmp_path / "data"))  # each night's is set by the script
    for name in [n for n in os.environ if n.startswith("T2V_") and n != "T2V_DATA_DIR"]:
        monkeypatch.delenv(name)
    out = tmp_path / "out"
    few_step.main(["--tiny", "--out", str(out), "--work", str(tmp_path / "work"), *args])
    return json.loads((out / "few_step.json").read_text())


def test_few_step_times_each_dmd_clip_and_night_by_stage_and_the_lora_night_against_the_plain_one(
    tmp_path, monkeypatch
):
    from safetensors import safe_open

    results = _few_step(tmp_path, monkeypatch)
    assert {"gpu", "cap_gib", "clips", "lora_night_ratio", "finish_codec"} <= set(results)
    assert [c["resolution"] for c in results["clips"]] == ["96x64x9", "64x32x5"]
    for clip in results["clips"]:
        assert (clip["steps"], clip["sampler"], clip["timesteps"]) == (3, "dmd", [1000, 757, 522])
        assert clip["failed"] == {} and clip["oom_attempts"] == []
        parts = [clip[f"{s.name}_s"] for s in stages()]
        assert all(part > 0 for part in parts) and clip["other_s"] >= 0
        assert sum(parts) + clip["other_s"] == pytest.approx(clip["total_s"])
        assert set(clip["plans"]) == {s.name for s in stages()}
        # The diffusion's steps and the decoder's passes, each inside its stage's compute
        assert {"diffuse", "decode"} <= set(clip["steps_s"])
        assert all(0 < clip["steps_s"][n] <= clip["compute_s"][n] for n in clip["steps_s"])
    # A night of DMD clips: every stage ran for each of its jobs, and a clip's share of the night.
    assert [n["resolution"] for n in results["dmd_nights"]] == ["96x64x9", "64x32x5"]
    for dmd in results["dmd_nights"]:
        assert (dmd["jobs"], dmd["steps"], dmd["failed"]) == (2, 3, {})
        assert dmd["per_clip_s"] == pytest.approx(dmd["total_s"] / 2)
        assert all(0 < dmd[f"{s.name}_s"] <= dmd["total_s"] for s in stages()) and "other_s" not in dmd
        assert set(dmd["plans"]) == {s.name for s in stages()}
    night = results["lora_night"]
    without, styled = night["without"], night["with"]
    assert results["lora_night_ratio"] == pytest.approx(styled["wall_s"] / without["wall_s"])
    assert (night["jobs"], night["steps"], without["clips"], styled["clips"]) == (2, 2, 2, 2)
    assert without["failed"] == styled["failed"] == {} and len(styled["diffuse_job_s"]) == 2
    assert night["layout"] == ["style1:1.0", "style2:0.8"]
    # The files are diffusers' layout (what WanPipeline.save_lora_weights writes), rank 4, every block.
    lora_file = tmp_path / "work" / "loras" / "style1" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.blocks.0.attn1.to_q.lora_A.weight").shape[0] == 4
    assert len(keys) == 2 * len(night["layers"]) * 2  # tiny: two blocks, A and B per layer
    # One phase again: the other's figures are kept.
    again = _few_step(tmp_path, monkeypatch, "--phases", "lora")
    assert again["clips"] == results["clips"] and again["dmd_nights"] == results["dmd_nights"]
    assert again["lora_night_ratio"] != results["lora_night_ratio"]


def test_the_first_compiled_job_s_excess_over_the_later_ones_is_counted_as_compile():
    events = [
        (label(diffuse.STAGE), "t", start, start + took)
        for start, took in ((0, 30.0), (40, 14.0), (60, 14.5), (80, 13.9))
    ]
    # A file from before the hooks, which timed the compile call apart.
    ours = {"compute_s": {"compile_call": 0.5}, "calls": {"compile_call": 1}, "events": events}
    assert compile_seconds(ours) == {"call": 0.5, "first_steps": 16.0, "total": 16.5}
    ours["calls"] = {}  # a night that did not compile: its first job is just a job
    assert compile_seconds(ours)["total"] == 0.5 and compile_seconds(ours)["first_steps"] == 0
    # Today's records: the call is inside the first job's compute, the night says whether it compiled.
    ours = {"compute_s": {}, "calls": {}, "events": events, "compiled": True}
    assert compile_seconds(ours) == {"call": 0.0, "first_steps": 16.0, "total": 16.0}


def test_the_50_step_total_counts_every_step_that_holds_a_compile_as_measured():
    from bench.clock import total_50

    # Eager: the first step as measured, the rest at the median of the later ones.
    assert total_50(1.0, [2.4, 2.2, 2.2], 9.0) == pytest.approx(1.0 + 2.4 + 49 * 2.2 + 9.0)
    # Compiled at once: the first step holds the compile.
    assert total_50(1.0, [12.7, 1.83, 1.83], 9.0) == pytest.approx(1.0 + 12.7 + 49 * 1.83 + 9.0)
    # Compiled after group offloading's first forward: the second step compiles too (measured at 480P
    # under 6 GiB: 3.61, 4.43, 0.35 s); the median of the later two would have counted 2.39 s a step.
    assert total_50(4.8, [3.61, 4.43, 0.35], 2.8) == pytest.approx(4.8 + 3.61 + 4.43 + 48 * 0.35 + 2.8)
    assert total_50(0.5, [0.8], 1.0) == pytest.approx(0.5 + 50 * 0.8 + 1.0)


def test_the_card_timeline_splits_a_stage_around_its_holds():
    name = label(decode.STAGE)
    events = [
        (f"stage_{name}", "main", 10.0, 30.0),
        ("card", "a", 12.0, 17.0),
        (name, "a", 12.5, 16.5),
        ("card", "b", 18.0, 25.0),
        (name, "b", 18.0, 24.0),
    ]
    timeline = card_timeline(events)[name]
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


def _night_events(t0: float) -> list[Event]:
    """A two-job night as the runner's hooks report it: each card stage prefetched in the background,
    placed in its first job's compute, held, computed and written; the clips finished off the card."""
    out: list[Event] = []

    def span(name, stage, start, end, *, job=None, plan=None, thread="task"):
        out.append(Event(name, "start", stage.name, job, plan, t0 + start, thread))
        out.append(Event(name, "end", stage.name, job, plan, t0 + end, thread))

    at = 1.0
    for stage in (encode.STAGE, diffuse.STAGE, decode.STAGE):
        span("load", stage, at - 0.8, at - 0.2, thread="t2v-prefetch_0")  # beside the stage before
        for n, job in enumerate(("a", "b")):
            plan = f"{stage.name}:cpu"
            span("card-wait", stage, at, at + 0.1, job=job, plan=plan)
            span("card", stage, at + 0.1, at + 2.1, job=job, plan=plan)
            span("compute", stage, at + 0.2, at + 2.0, job=job, plan=plan)
            if n == 0:
                span("place", stage, at + 0.3, at + 0.8, plan=plan)
            span("write", stage, at + 2.1, at + 2.4, job=job, plan=plan)
            at += 2.5
        at += 1.0
    span("compute", CLIP, at - 3.0, at + 0.5, job="b")
    return sorted(out, key=lambda e: (e.t, e.phase == "start"))


def test_the_timeline_counts_model_compute_without_the_placing_and_the_split_adds_up():
    timeline = Timeline()
    for event in _night_events(timeline.t0):
        timeline.on_event(event)
    end = timeline.t0 + 30.0
    timeline.finish(end)
    seconds, calls = timeline.seconds, timeline.calls
    for stage in (encode.STAGE, diffuse.STAGE, decode.STAGE):
        name = label(stage)
        assert seconds[name] == pytest.approx(2 * 1.8 - 0.5)  # two computes less one placing
        assert seconds[f"apply_{name}"] == pytest.approx(0.5)
        assert seconds[f"stage_{name}"] == pytest.approx(4.9)  # the first job's wait to the last write
        assert calls[f"runner_{name}"] == 2 and calls["stage_" + name] == 1
    assert calls["prefetch"] == 3 and seconds["prefetch"] == pytest.approx(1.8)
    assert seconds[f"{label(CLIP)}_tail"] == pytest.approx(19.5 - 17.9)  # the last clip after the last write
    assert seconds["flow_before_stages"] == pytest.approx(1.0) and seconds[
        "flow_after_stages"
    ] == pytest.approx(10.5)
    ours = {
        "wall_s": 30.0,
        "clips": 2,
        "compute_s": seconds,
        "calls": calls,
        "events": timeline.events,
        "rows": [],
        "peak_reserved_gib": None,
        "peak_nvml_gib": None,
    }
    results = summarise({"phases": {"ours": ours}})
    compute = sum(seconds[label(s)] for s in (encode.STAGE, diffuse.STAGE, decode.STAGE))
    assert compute + sum(results["ours_overhead_s"].values()) == pytest.approx(30.0)
    assert results["ours_overhead_s"]["loads"] == pytest.approx(1.5)
    assert all(t["holds"] == 2 for t in results["card_timeline_s"].values())


def test_the_gpu_machine_codec_keeps_frames_and_reaches_runs_through_t2v_hooks(tmp_path):
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    codec = hooks_from(GPU_MACHINE_HOOKS).codec
    assert isinstance(codec, NpyCodec)
    stored = tmp_path / "frames.mkv"
    codec.write_frames(frames, stored, fps=24)
    assert stored.exists() and np.array_equal(codec.read_frames(stored), frames)
    codec.encode_clip(stored, tmp_path / "clip.mp4", fps=24, steps=[], max_bytes=1000)
    assert np.array_equal(np.load(tmp_path / "clip.mp4"), frames)


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_no_bench_function_is_over_80_lines(path):
    tree = ast.parse(path.read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(tree)}
    assert {name: n for name, n in long.items() if n > MAX_FUNCTION_LINES} == {}


def _imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_patches_no_library_function(path):
    """No `setattr(...)`, and no assignment to an attribute of anything imported (`media.encode_mp4 =`,
    `StageRunner.run =`): benchmarks measure through the runner's hooks."""
    tree = ast.parse(path.read_text())
    calls = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("setattr", "delattr")
    ]
    assert calls == [], f"{path.name}: setattr/delattr at lines {calls}"
    imported = _imported_names(tree)
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            for target in node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]:
                root = _root(target)
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in imported:
                    targets.append(f"{ast.unparse(target)} (line {node.lineno})")
    assert targets == [], f"{path.name} assigns to attributes of imported modules or classes: {targets}"


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_matches_no_stage_by_its_name(path):
    """Stages are the registry's objects: no string constant in bench/ is a stage's name (or a former one)."""
    names = {n for s in stages() for n in (s.name, *s.formerly)}
    found = [
        f"{n.value!r} (line {n.lineno})"
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and n.value in names
    ]
    assert found == []


def test_gpu_memory_cases_take_switches_and_state_their_deviation_from_stock(tmp_path):
    from bench import gpu_memory

    cases = "stock-gpu,ours,ours+attn=sdpa,ours-cap6+attn=efficient"
    gpu_memory.main(
        ["--tiny", "--out", str(tmp_path), "--resolutions", "96x64x9", "--cases", cases, "--steps", "2"]
    )
    records = {r["config"]: r for r in json.loads((tmp_path / "gpu_memory.json").read_text())}
    assert list(records) == cases.split(",")
    ours, sdpa = records["ours"], records["ours+attn=sdpa"]
    # sdpa is what `ours` runs off a card: the switch names it and changes nothing.
    assert sdpa["latents_rel_diff_vs_stock_gpu"] == ours["latents_rel_diff_vs_stock_gpu"]
    assert all(len(r["step_times_s"]) == 2 for r in (ours, sdpa))
    # A kernel this machine lacks (the CPU has no memory-efficient SDPA) fails its case alone, saved.
    assert records["ours-cap6+attn=efficient"]["error"].startswith("RuntimeError")

    with pytest.raises(SystemExit, match="unknown switch 'warp'"):
        gpu_memory.main(["--tiny", "--out", str(tmp_path / "bad"), "--cases", "ours+warp"])
    assert not (tmp_path / "bad").exists()  # refused before any weights were built


def test_lora_fold_times_the_three_paths_and_the_folded_one_matches_unmerged(tmp_path):
    from bench import lora_fold

    lora_fold.main(["--tiny", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    results = json.loads((tmp_path / "lora_fold.json").read_text())
    records = {r["case"]: r for r in results["records"]}
    assert list(records) == ["none", "unmerged", "folded"] and results["rank"] == 4
    assert all(r["step_s"] > 0 and len(r["step_times_s"]) == 3 for r in records.values())
    # Tiny runs in fp32: unmerged is its own reference; folding only reorders the sum.
    assert records["unmerged"]["latents_rel_l2_vs_fp32_unmerged"] == 0
    assert 0 < records["folded"]["latents_rel_l2_vs_fp32_unmerged"] < 1e-5
    assert records["none"]["latents_rel_l2_vs_fp32_unmerged"] > 1e-3  # the style changes the latents
