"""One phase of bench/multi_gpu.py: its workers started, one flow run per shard triggered together and
waited for, then what each flow run made, read from the run log, the workers' logs and Prefect's API."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.night import log, stop

ROOT = Path(__file__).resolve().parents[1]
POOL = "gpu-bench"
DEPLOYMENT = "nightly/nightly"
NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Phase:
    """What a phase started and saw, for the records made after it."""

    name: str
    shards: list[str | None]
    data: Path
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    out: dict = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    """Before its workers started: a worker whose heartbeat is older is the last phase's."""
    triggered: datetime | None = None
    flow_runs: list = field(default_factory=list)


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def peak(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def span(rows: list[dict]) -> float | None:
    starts = [parse_time(r["started"]) for r in rows if r["started"]]
    ends = [parse_time(r["finished"]) for r in rows if r["finished"]]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def outputs_summary(data: Path) -> dict:
    """The published clips of a phase: how many, and how many are .npy data under an .mp4 name."""
    clips = sorted((data / "outputs").glob("*/*.mp4"))
    npy = 0
    for clip in clips:
        with open(clip, "rb") as f:
            npy += f.read(len(NPY_MAGIC)) == NPY_MAGIC
    return {"files": len(clips), "npy_content": npy, "names": [c.name for c in clips]}


def start_workers(phase: Phase, phase_dir: Path, env: dict[str, str]) -> None:
    """One `prefect worker start` per shard, worker i seeing card i alone."""
    for card in range(len(phase.shards)):
        worker = f"gpu{card}"
        phase.logs[worker] = phase_dir / f"worker-{worker}.log"
        with open(phase.logs[worker], "wb") as f:
            phase.workers[worker] = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"]
                + ["--name", worker],
                env=env | {"CUDA_VISIBLE_DEVICES": str(card)},
                cwd=ROOT,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def wait_until_online(client, phase: Phase) -> None:
    """Until every worker has polled the pool (or one exited), so that no phase pays a worker's start."""
    online: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        online = {
            w.name
            for w in client.read_workers_for_work_pool(POOL)
            # This phase's workers, not the first phase's gpu0 whose last heartbeat is recent.
            if w.status == "ONLINE" and w.last_heartbeat_time and w.last_heartbeat_time > phase.started
        }
        if set(phase.workers) <= online or any(p.poll() is not None for p in phase.workers.values()):
            break
        time.sleep(0.5)
    phase.out["workers_online_before_trigger"] = sorted(online & set(phase.workers))


def wait_for_flow_runs(client, phase: Phase, t0: float, timeout_s: float) -> None:
    """Poll the flow runs until all are final, every worker exited, or `timeout_s`; their wall time."""
    final_at: dict = {}
    last_state: dict = {}
    while len(final_at) < len(phase.flow_runs) and time.perf_counter() - t0 < timeout_s:
        for fr in phase.flow_runs:
            if fr.id in final_at:
                continue
            state = client.read_flow_run(fr.id).state
            if state is not None and state.name != last_state.get(fr.id):
                last_state[fr.id] = state.name
                log(f"{phase.name}: flow run {fr.name} ({fr.parameters.get('shard')}): {state.name}")
            if state is not None and state.is_final():
                final_at[fr.id] = time.perf_counter()
        if all(p.poll() is not None for p in phase.workers.values()):
            phase.out["error"] = "every worker exited before the flow runs ended"
            break
        time.sleep(0.25)
    done = len(final_at) == len(phase.flow_runs)
    phase.out["timed_out"] = not done and "error" not in phase.out
    phase.out["wall_s"] = (max(final_at.values()) - t0) if done else None


def trigger_and_wait(phase: Phase, timeout_s: float) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        wait_until_online(client, phase)
        log(f"{phase.name}: {len(phase.workers)} worker(s) up; triggering {len(phase.shards)} flow run(s)")
        phase.triggered = datetime.now(UTC)
        t0 = time.perf_counter()
        phase.flow_runs = [
            client.create_flow_run_from_deployment(deployment.id, parameters={"shard": shard})
            for shard in phase.shards
        ]
        phase.out["trigger_s"] = time.perf_counter() - t0
        wait_for_flow_runs(client, phase, t0, timeout_s)
        phase.flow_runs = [client.read_flow_run(fr.id) for fr in phase.flow_runs]


def worker_of(worker_logs: dict[str, str], flow_run: str) -> str | None:
    """Which worker (card) ran a flow run: only that worker logs it as submitted to infrastructure and
    relays its process's output (both workers may log that they try to submit a run; one is refused)."""
    for marker in (f"Flow run '{flow_run}' submitted to infrastructure", f"Flow run '{flow_run}' - "):
        found = [w for w, text in worker_logs.items() if marker in text]
        if len(found) == 1:
            return found[0]
    return None


def night_templates_of(jobs_json: str) -> list[str]:
    try:
        return [j["template"] for j in json.loads(jobs_json)["jobs"]]
    except (ValueError, KeyError, TypeError):
        return []


def _seconds(later, earlier) -> float | None:
    return (later - earlier).total_seconds() if later and earlier else None


def flow_run_record(
    fr, runlog_runs: list[dict], templates: list[str], phase: Phase, worker: str | None
) -> dict:
    """One flow run: its state, card, shard, what it made, its span and peaks from its run-log rows."""
    from bench.timeline import label  # it imports the stage registry (torch): not before it is needed
    from t2v.pipeline import CLIP, stages
    from t2v.shards import select_shard

    shard = fr.parameters.get("shard")
    assigned = list(select_shard(templates, shard))
    mine = [r for r in runlog_runs if r["jobs_json"] and night_templates_of(r["jobs_json"]) == assigned]
    run = mine[0] if len(mine) == 1 else {}
    rows = run.get("stages", [])
    starts = [parse_time(r["started"]) for r in rows if r["started"]]
    ends = [parse_time(r["finished"]) for r in rows if r["finished"]]
    first, last = (min(starts) if starts else None), (max(ends) if ends else None)
    start_time, end_time = fr.start_time, fr.end_time
    return {
        "flow_run": fr.name,
        "id": str(fr.id),
        "shard": shard,
        "state": fr.state.name if fr.state else None,
        "worker": worker,
        "runlog_run": run.get("id"),
        "runlog_status": run.get("status"),
        "assigned": assigned,
        "made": [r["template"] for r in rows if r["stage"] == CLIP.name and r["status"] == "ok"],
        "span_s": span(rows),
        "first_stage_start": first.isoformat() if first else None,
        "last_stage_end": last.isoformat() if last else None,
        "prefect_start": start_time.isoformat() if start_time else None,
        "prefect_end": end_time.isoformat() if end_time else None,
        "prefect_run_s": _seconds(end_time, start_time),
        "pickup_s": _seconds(start_time, phase.triggered),
        "before_first_stage_s": _seconds(first, start_time),
        # A stage's jobs run as tasks submitted together (their rows overlap): its span, from its first
        # row's start to its last row's end, not the sum of its rows.
        "stage_span_s": {label(s): span([r for r in rows if r["stage"] == s.name]) for s in stages()},
        "plans": sorted({f"{r['stage']}:{r['plan']}" for r in rows if r["plan"]}),
        "peak_reserved_gib": peak(rows, "peak_reserved_gib"),
        "peak_nvml_gib": peak(rows, "peak_nvml_gib"),
        "peak_rss_gib": peak(rows, "peak_rss_gib"),
        "failed_rows": [
            {k: r[k] for k in ("template", "stage", "status", "error")}
            for r in rows
            if r["status"] not in ("ok", "skipped")
        ],
    }


def read_runlog(data: Path) -> tuple[list[dict], Counter]:
    """The phase's runs in its run log, and how often each (template, stage) was computed."""
    from t2v.runlog import RunLog, sqlite_url

    runs = (
        RunLog(sqlite_url(data / "runlog.sqlite")).runs(limit=100)
        if (data / "runlog.sqlite").exists()
        else []
    )
    counted: Counter = Counter()
    for run in runs:
        counted.update((r["template"], r["stage"]) for r in run["stages"] if r["status"] == "ok")
    return runs, counted


def phase_summary(phase: Phase, templates: list[str]) -> dict:
    """The phase's record: per flow run, and over them (clips, spans, no job twice, the split)."""
    from t2v.pipeline import CLIP, stages

    worker_logs = {w: p.read_text(errors="replace") if p.exists() else "" for w, p in phase.logs.items()}
    runlog_runs, counted = read_runlog(phase.data)
    runs = [
        flow_run_record(fr, runlog_runs, templates, phase, worker_of(worker_logs, fr.name))
        for fr in phase.flow_runs
    ]
    clips = sum(n for (_, stage), n in counted.items() if stage == CLIP.name)
    spans = [r["span_s"] for r in runs]
    steady = max(spans) if spans and None not in spans else None
    out = phase.out | {
        "completed": all(r["state"] == "Completed" for r in runs) and len(runs) == len(phase.shards),
        "clips": clips,
        "clips_per_hour_wall": 3600 * clips / phase.out["wall_s"] if phase.out.get("wall_s") else None,
        "steady_span_s": steady,
        "clips_per_hour_steady": 3600 * clips / steady if steady else None,
        "runlog_runs": len(runlog_runs),
        "no_job_twice": all(n == 1 for n in counted.values()),
        "computed_twice": sorted(f"{t}/{s}" for (t, s), n in counted.items() if n > 1),
        "not_made": sorted(f"{t}/{s.name}" for t in templates for s in stages() if counted[(t, s.name)] == 0),
        "split": {r["worker"] or r["flow_run"]: r["made"] for r in runs},
        "per_card_peak_gib": {
            r["worker"] or r["flow_run"]: {"reserved": r["peak_reserved_gib"], "nvml": r["peak_nvml_gib"]}
            for r in runs
        },
        "outputs": outputs_summary(phase.data),
        "runs": runs,
    }
    if not out["completed"] or out["not_made"] or not out["no_job_twice"]:
        out["worker_log_tails"] = {w: text[-6000:] for w, text in worker_logs.items()}
    return out


def run_phase(
    name: str,
    shards: list[str | None],
    *,
    work: Path,
    worker_env: dict[str, str],
    templates: list[str],
    timeout_s: float,
) -> dict:
    """Start one worker per shard, trigger one flow run per shard at once, wait, read the run log."""
    phase_dir = work / name
    phase_dir.mkdir(parents=True, exist_ok=True)
    phase = Phase(name=name, shards=shards, data=phase_dir / "data")
    phase.out = {"workers": len(shards), "shards": shards, "data_dir": str(phase.data)}
    try:
        start_workers(phase, phase_dir, worker_env | {"T2V_DATA_DIR": str(phase.data)})
        trigger_and_wait(phase, timeout_s)
    finally:
        for proc in phase.workers.values():
            stop(proc)
    return phase_summary(phase, templates)
