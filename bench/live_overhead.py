"""What the live record (t2v.engine.live: progress, memory timeline, heartbeat) costs a night on the CPU.

Two measurements, on the tiny model (no GPU, no Prefect: the stage runner itself, as a flow drives it):

- **per beat**: the recorder's thread's work once a second, a memory sample (psutil RSS, the cgroup's
  memory.current) and the run-log transaction (heartbeat, a progress row, the chunk being filled), timed
  `--beats` times against a real SQLite run log; and a progress report (`Hooks.progress`, what a
  diffusion step pays on its own thread), timed a million times. Their cost a second is the overhead.
- **a night**: the same jobs (`--jobs` of `--steps` steps at 256x448x17) run through encode, diffuse,
  decode and finish with the recorder running and without, alternately, `--repeats` times each, each
  in a fresh data folder; the median and the fastest wall time of each, and the CPU seconds the
  recorder's thread used. On a shared machine the nights are noisier than the overhead they measure,
  so the per-beat figure and the thread's CPU time are the ones to quote.

    python bench/live_overhead.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import t2v  # noqa: F401 - before torch, as the CLI does
from t2v.context import RunContext
from t2v.engine import StageRunner
from t2v.engine.live import LiveRecorder, MemoryProbe
from t2v.jobs import JobSpec
from t2v.pipeline import PIPELINE
from t2v.runlog import RunLog
from t2v.settings import Settings


def _runner(root: Path) -> StageRunner:
    settings = Settings(data_dir=root, database_url=f"sqlite:///{root / 'runlog.sqlite'}")
    root.mkdir(parents=True, exist_ok=True)
    run_id = RunLog(settings.runlog_url).start_run(kind="nightly", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=root / "out", settings=settings)
    return StageRunner(ctx)


def per_beat(root: Path, beats: int) -> dict[str, float]:
    """Seconds of one beat's memory sample and of its write, and of one progress report."""
    runner = _runner(root)
    record = LiveRecorder(runner.runlog, runner.run_id, "cpu")
    record._started = time.time()  # as __enter__ sets it, without starting the thread
    probe = MemoryProbe("cpu")
    stage, job = PIPELINE[1], JobSpec(template="fox", prompt="a fox")
    sample_s = write_s = 0.0
    for i in range(beats):
        record.hooks().progress(stage, job, i, beats)
        t0 = time.perf_counter()
        record._sample(probe)
        t1 = time.perf_counter()
        record._flush()
        sample_s, write_s = sample_s + t1 - t0, write_s + time.perf_counter() - t1
    hooks, n = runner.hooks, 1_000_000
    t0 = time.perf_counter()
    for i in range(n):
        hooks.progress(stage, job, i, n)
    report_s = (time.perf_counter() - t0) / n
    return {"sample_s": sample_s / beats, "write_s": write_s / beats, "report_s": report_s}


def night(root: Path, jobs: list[JobSpec], *, live: bool) -> tuple[float, float, int]:
    """Wall seconds of every stage of `jobs`, stage-major as a night runs them; the recorder's CPU
    seconds and writes."""
    runner = _runner(root)
    t0 = time.perf_counter()
    with runner.live if live else nullcontext():
        for stage in PIPELINE:
            for job in jobs:
                runner.run(stage, job)
    return time.perf_counter() - t0, runner.live.cpu_s, runner.live.writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beats", type=int, default=300)
    parser.add_argument("--beats-only", action="store_true", help="skip the nights")
    parser.add_argument("--out", type=Path, default=None, help="folder for live_overhead.json")
    args = parser.parse_args()
    jobs = [
        JobSpec(
            template=f"job{i}",
            prompt=f"a fox number {i}",
            seed=i,
            height=256,
            width=448,
            frames=17,
            steps=args.steps,
        )
        for i in range(args.jobs)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        beat = per_beat(Path(tmp) / "beats", args.beats)
        walls: dict[str, list[float]] = {"off": [], "on": []}
        thread_cpu = []  # (CPU s, writes) of the recorder's thread in each night it ran
        if not args.beats_only:
            night(Path(tmp) / "warm-up", jobs[:1], live=False)  # imports, the tiny model's first build
        for i in range(0 if args.beats_only else args.repeats):
            for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):  # alternate: drift hits both
                wall, cpu, writes = night(Path(tmp) / f"{mode}-{i}", jobs, live=mode == "on")
                walls[mode].append(wall)
                if mode == "on":
                    thread_cpu.append((cpu, writes))
    off, on = (round(statistics.median(walls[m]), 3) if walls[m] else None for m in ("off", "on"))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "steps": args.steps,
        "size": "256x448x17",
        "sample_ms": round(beat["sample_s"] * 1e3, 3),
        "write_ms": round(beat["write_s"] * 1e3, 3),
        # One beat a second (SAMPLE_S): its seconds are the share of one core it takes.
        "beat_share_of_a_core": round(beat["sample_s"] + beat["write_s"], 5),
        "progress_report_ns": round(beat["report_s"] * 1e9, 1),
        "night_off_s": [round(w, 3) for w in walls["off"]],
        "night_on_s": [round(w, 3) for w in walls["on"]],
        "median_off_s": off,
        "median_on_s": on,
        "night_overhead_median": round(on / off - 1, 4) if on and off else None,
        # Other processes on a shared machine only ever add time: the fastest night of each mode is
        # the least disturbed one, the usual figure for a benchmark among noise.
        "fastest_off_s": round(min(walls["off"]), 3) if walls["off"] else None,
        "fastest_on_s": round(min(walls["on"]), 3) if walls["on"] else None,
        "night_overhead_fastest": round(min(walls["on"]) / min(walls["off"]) - 1, 4) if walls["on"] else None,
        "recorder_cpu_s_per_night": [round(cpu, 4) for cpu, _ in thread_cpu],
        "recorder_writes_per_night": [writes for _, writes in thread_cpu],
        "recorder_cpu_share": round(sum(c for c, _ in thread_cpu) / sum(walls["on"]), 5)
        if thread_cpu
        else None,
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "live_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
