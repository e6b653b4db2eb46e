"""Nightly throughput from one GPU worker to two, through the real deployment path.

What it measures: the same night (`--jobs` templates at 832x480x81, `--steps` steps, on the full-size
architecture with random weights under a `--cap-gib` VRAM budget per card) made twice against a local
`prefect server start` that this script starts, deployed with `deployments.deploy.deploy` exactly as
`t2v deploy --gpus 2` does (process pool, `gpu` concurrency limit, `nightly/nightly` deployment):

  one   ONE `prefect worker start --pool gpu-bench --limit 1` (CUDA_VISIBLE_DEVICES=0) and ONE flow
        run of the whole night (shard None);
  two   one worker per card (CUDA_VISIBLE_DEVICES=0, 1) and one flow run per shard ("0/2", "1/2"),
        triggered together, as the deployment's per-shard schedules start them at night.

Each phase has its own data folder (T2V_DATA_DIR), so the second finds none of the first's outputs in
the store. Reported per phase: wall time from the trigger until every flow run is final (worker pickup,
process start, imports and model builds included) and clips/hour from it; the steady-state span of
each flow run from its run log (first stage row's start to last stage row's end; the night's time once
its process is up) and clips/hour from the longest span; which templates each flow run made; whether any
(template, stage) was computed twice ("no job run twice"); peak reserved and NVML VRAM per card; the
flow runs' own start/end times from the Prefect API. Then the scaling ratios two/one of both. Results go
to `<out>/multi_gpu.json`, written after each phase so a timeout still leaves the first.

    python bench/multi_gpu.py --out bench/results              # on a 2-GPU machine (the device tool)
    python bench/multi_gpu.py --tiny --out /tmp/multi-tiny     # CPU smoke run: built-in model, 96x64x9

With `--tiny` the "GPUs" are just two worker processes (CUDA_VISIBLE_DEVICES is set all the same).
Where there is no ffmpeg binary (the GPU machine), or with `--no-ffmpeg`, the flow-run processes save
lossless frames as .npy and "encode" a clip by copying those frames: a `sitecustomize.py` on the
workers' PYTHONPATH patches `t2v.media` when T2V_BENCH_NO_FFMPEG=1 (the published .mp4 files then hold
.npy data, which the JSON counts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.night import NEGATIVE, PROMPTS, free_port, log, wait_for_server  # noqa: E402

POOL = "gpu-bench"
DEPLOYMENT = "nightly/nightly"
RANDOM_FULL_SIZE = "wan2.2-ti2v-5b-random"  # t2v.models.registry.RANDOM_FULL_SIZE, without importing torch
STAGES = ("encode", "diffuse", "decode", "watermark")
NPY_MAGIC = b"\x93NUMPY"
SITECUSTOMIZE = '''"""Written by bench/multi_gpu.py for its workers' flow-run processes: with
T2V_BENCH_NO_FFMPEG=1, lossless frames are saved as .npy and a clip's "encoding" copies them, so no
ffmpeg binary is needed."""

import os


def _chain() -> None:
    """Run the sitecustomize that this one shadows, if there is one further down sys.path."""
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _frames_to_npy() -> None:
    from bench.night import frames_to_npy

    frames_to_npy()


_chain()
if os.environ.get("T2V_BENCH_NO_FFMPEG") == "1":
    _frames_to_npy()
'''


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({type(exc).__name__}: {exc})"


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Terminate `proc` (kill after `grace_s`), then any of its descendants still alive (flow runs)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def gpu_names(env: dict[str, str]) -> list[str] | str:
    """torch.cuda's name of each visible device, asked in a child so this process holds no CUDA context."""
    code = (
        "import json, torch\n"
        "c = torch.cuda\n"
        "print(json.dumps([c.get_device_name(i) for i in range(c.device_count())] if c.is_available()"
        " else 'cpu'))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        return f"unknown ({type(exc).__name__})"


def write_catalogue(path: Path, count: int, *, height: int, width: int, frames: int, steps: int) -> list[str]:
    """`count` templates with distinct names and prompts, seeds 1..count; returns the names in order."""
    names, text = [], []
    for i in range(count):
        name, prompt = PROMPTS[i % len(PROMPTS)]
        name = name if i < len(PROMPTS) else f"{name}-{i}"
        values = {
            "prompt": prompt if i < len(PROMPTS) else f"{prompt}, take {i // len(PROMPTS) + 1}",
            "negative_prompt": NEGATIVE,
            "seed": i + 1,
            "height": height,
            "width": width,
            "frames": frames,
            "steps": steps,
        }
        text.append(
            f"[[template]]\nname = {json.dumps(name)}\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        )
        names.append(name)
    path.write_text("\n".join(text))
    return names


def _span(rows: list[dict]) -> float | None:
    starts = [parse_time(r["started"]) for r in rows if r["started"]]
    ends = [parse_time(r["finished"]) for r in rows if r["finished"]]
    return (max(ends) - min(starts)).total_seconds() if starts and ends else None


def import_probe(env: dict[str, str]) -> dict[str, float]:
    """Seconds a fresh Python process takes to start and import the nightly flow (what each flow run
    pays before its flow begins), measured once before the phases: it also warms the file cache and the
    bytecode for both phases alike."""
    code = "import time; t = time.perf_counter(); import flows.nightly; print(time.perf_counter() - t)"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    total = time.perf_counter() - start
    if done.returncode != 0:
        return {"process_s": total, "error": done.stderr[-2000:]}
    return {"process_s": total, "import_flow_s": float(done.stdout.strip().splitlines()[-1])}


def start_server(work: Path, base_env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; (proc, Prefect env)."""
    port = free_port()
    prefect_env = {
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    server_env = (
        base_env
        | prefect_env
        | {
            # No runs from the deployment's 02:00 cron schedules: only the ones triggered here.
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        }
    )
    (work / "prefect").mkdir(parents=True, exist_ok=True)
    with open(work / "server.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, prefect_env


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def peak(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


def outputs_summary(data: Path) -> dict:
    """The published clips of a phase: how many, and how many are .npy data under an .mp4 name."""
    clips = sorted((data / "outputs").glob("*/*.mp4"))
    npy = 0
    for clip in clips:
        with open(clip, "rb") as f:
            npy += f.read(len(NPY_MAGIC)) == NPY_MAGIC
    return {"files": len(clips), "npy_content": npy, "names": [c.name for c in clips]}


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
    from prefect.client.orchestration import get_client

    from t2v.runlog import RunLog, sqlite_url
    from t2v.shards import select_shard

    phase_dir = work / name
    data = phase_dir / "data"
    phase_dir.mkdir(parents=True, exist_ok=True)
    env = worker_env | {"T2V_DATA_DIR": str(data)}
    out: dict = {"workers": len(shards), "shards": shards, "data_dir": str(data)}
    workers: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    started = datetime.now(UTC)
    try:
        for card in range(len(shards)):
            worker = f"gpu{card}"
            logs[worker] = phase_dir / f"worker-{worker}.log"
            with open(logs[worker], "wb") as f:
                workers[worker] = subprocess.Popen(
                    [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"]
                    + ["--name", worker],
                    env=env | {"CUDA_VISIBLE_DEVICES": str(card)},
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            # Trigger only once every worker has polled the pool, so neither phase pays a worker's start.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                online = {
                    w.name
                    for w in client.read_workers_for_work_pool(POOL)
                    # This phase's workers, not the first phase's gpu0 whose last heartbeat is recent.
                    if w.status == "ONLINE" and w.last_heartbeat_time and w.last_heartbeat_time > started
                }
                if set(workers) <= online or any(p.poll() is not None for p in workers.values()):
                    break
                time.sleep(0.5)
            out["workers_online_before_trigger"] = sorted(online & set(workers))
            log(f"{name}: {len(workers)} worker(s) up; triggering {len(shards)} flow run(s)")
            triggered = datetime.now(UTC)
            t0 = time.perf_counter()
            flow_runs = [
                client.create_flow_run_from_deployment(deployment.id, parameters={"shard": shard})
                for shard in shards
            ]
            out["trigger_s"] = time.perf_counter() - t0
            final_at: dict = {}
            last_state: dict = {}
            while len(final_at) < len(flow_runs) and time.perf_counter() - t0 < timeout_s:
                for fr in flow_runs:
                    if fr.id in final_at:
                        continue
                    state = client.read_flow_run(fr.id).state
                    if state is not None and state.name != last_state.get(fr.id):
                        last_state[fr.id] = state.name
                        log(f"{name}: flow run {fr.name} ({fr.parameters.get('shard')}): {state.name}")
                    if state is not None and state.is_final():
                        final_at[fr.id] = time.perf_counter()
                if all(p.poll() is not None for p in workers.values()):
                    out["error"] = "every worker exited before the flow runs ended"
                    break
                time.sleep(0.25)
            out["timed_out"] = len(final_at) < len(flow_runs) and "error" not in out
            out["wall_s"] = (max(final_at.values()) - t0) if len(final_at) == len(flow_runs) else None
            flow_runs = [client.read_flow_run(fr.id) for fr in flow_runs]
    finally:
        for proc in workers.values():
            stop(proc)

    # Which worker (card) ran each flow run: only that worker logs it as submitted to infrastructure and
    # relays its process's output (both workers may log that they try to submit a run; one is refused).
    worker_logs = {w: p.read_text(errors="replace") if p.exists() else "" for w, p in logs.items()}

    def took(flow_run: str) -> str | None:
        for marker in (f"Flow run '{flow_run}' submitted to infrastructure", f"Flow run '{flow_run}' - "):
            found = [w for w, text in worker_logs.items() if marker in text]
            if len(found) == 1:
                return found[0]
        return None

    runlog_runs = []
    if (data / "runlog.sqlite").exists():
        runlog_runs = RunLog(sqlite_url(data / "runlog.sqlite")).runs(limit=100)
    counted: Counter = Counter()
    for run in runlog_runs:
        counted.update((r["template"], r["stage"]) for r in run["stages"] if r["status"] == "ok")
    runs = []
    for fr in flow_runs:
        shard = fr.parameters.get("shard")
        assigned = list(select_shard(templates, shard))
        mine = [r for r in runlog_runs if r["jobs_json"] and _night_templates(r["jobs_json"]) == assigned]
        rows = mine[0]["stages"] if len(mine) == 1 else []
        starts = [parse_time(r["started"]) for r in rows if r["started"]]
        ends = [parse_time(r["finished"]) for r in rows if r["finished"]]
        span = _span(rows)
        start_time, end_time = fr.start_time, fr.end_time
        runs.append(
            {
                "flow_run": fr.name,
                "id": str(fr.id),
                "shard": shard,
                "state": fr.state.name if fr.state else None,
                "worker": took(fr.name),
                "runlog_run": mine[0]["id"] if len(mine) == 1 else None,
                "runlog_status": mine[0]["status"] if len(mine) == 1 else None,
                "assigned": assigned,
                "made": [r["template"] for r in rows if r["stage"] == "watermark" and r["status"] == "ok"],
                "span_s": span,
                "first_stage_start": min(starts).isoformat() if starts else None,
                "last_stage_end": max(ends).isoformat() if ends else None,
                "prefect_start": start_time.isoformat() if start_time else None,
                "prefect_end": end_time.isoformat() if end_time else None,
                "prefect_run_s": (end_time - start_time).total_seconds() if start_time and end_time else None,
                "pickup_s": (start_time - triggered).total_seconds() if start_time else None,
                "before_first_stage_s": (min(starts) - start_time).total_seconds()
                if starts and start_time
                else None,
                # A stage's jobs run as tasks submitted together (their rows overlap): its span, from its
                # first row's start to its last row's end, not the sum of its rows.
                "stage_span_s": {s: _span([r for r in rows if r["stage"] == s]) for s in STAGES},
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
        )
    clips = sum(n for (_, stage), n in counted.items() if stage == "watermark")
    spans = [r["span_s"] for r in runs]
    steady = max(spans) if spans and None not in spans else None
    out |= {
        "completed": all(r["state"] == "Completed" for r in runs) and len(runs) == len(shards),
        "clips": clips,
        "clips_per_hour_wall": 3600 * clips / out["wall_s"] if out.get("wall_s") else None,
        "steady_span_s": steady,
        "clips_per_hour_steady": 3600 * clips / steady if steady else None,
        "runlog_runs": len(runlog_runs),
        "no_job_twice": all(n == 1 for n in counted.values()),
        "computed_twice": sorted(f"{t}/{s}" for (t, s), n in counted.items() if n > 1),
        "not_made": sorted(f"{t}/{s}" for t in templates for s in STAGES if counted[(t, s)] == 0),
        "split": {r["worker"] or r["flow_run"]: r["made"] for r in runs},
        "per_card_peak_gib": {
            r["worker"] or r["flow_run"]: {"reserved": r["peak_reserved_gib"], "nvml": r["peak_nvml_gib"]}
            for r in runs
        },
        "outputs": outputs_summary(data),
        "runs": runs,
    }
    if not out["completed"] or out["not_made"] or not out["no_job_twice"]:
        out["worker_log_tails"] = {w: text[-6000:] for w, text in worker_logs.items()}
    return out


def _night_templates(jobs_json: str) -> list[str]:
    try:
        return [j["template"] for j in json.loads(jobs_json)["jobs"]]
    except (ValueError, KeyError, TypeError):
        return []


def print_table(results: dict) -> None:
    def num(v, fmt: str = ".1f") -> str:
        return format(v, fmt) if isinstance(v, int | float) else "-"

    head = f"{'phase':<6}{'workers':>8}{'clips':>6}{'wall s':>9}{'clips/h':>9}{'span s':>9}{'steady/h':>10}"
    print(f"\n{head}  split")
    for name in ("one", "two"):
        p = results.get(name)
        if not p:
            continue
        split = "; ".join(f"{w}: {','.join(t)}" for w, t in p.get("split", {}).items())
        print(
            f"{name:<6}{p['workers']:>8}{p.get('clips', 0):>6}{num(p.get('wall_s')):>9}"
            f"{num(p.get('clips_per_hour_wall')):>9}{num(p.get('steady_span_s')):>9}"
            f"{num(p.get('clips_per_hour_steady')):>10}  {split}"
        )
    print(
        f"scaling two/one: wall {num(results.get('scaling_wall'), '.2f')}, "
        f"steady {num(results.get('scaling_steady'), '.2f')}; no job twice: {results.get('no_job_twice')}"
    )
    head = f"{'phase':<6}{'worker':<7}{'shard':<7}{'state':<11}{'span s':>8}{'start s':>8}"
    print(f"\n{head}{'resv':>7}{'nvml':>7}")
    for name in ("one", "two"):
        for r in (results.get(name) or {}).get("runs", []):
            print(
                f"{name:<6}{r['worker'] or '?':<7}{r['shard'] or 'all':<7}{r['state'] or '?':<11}"
                f"{num(r['span_s']):>8}{num(r['before_first_stage_s']):>8}"
                f"{num(r['peak_reserved_gib'], '.2f'):>7}{num(r['peak_nvml_gib'], '.2f'):>7}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/t2v-multi-gpu"), help="wiped at start")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cap-gib", type=float, default=8.0, help="T2V_VRAM_BUDGET_GB of every card")
    parser.add_argument("--model", default=None, help=f"default {RANDOM_FULL_SIZE} (tiny with --tiny)")
    parser.add_argument("--gpus", type=int, default=2, help="workers (cards) of the second phase")
    parser.add_argument("--tiny", action="store_true", help="built-in model at 96x64x9: a CPU smoke run")
    parser.add_argument("--no-ffmpeg", action="store_true", help="act as if there were no ffmpeg binary")
    parser.add_argument("--timeout-s", type=float, default=5400, help="per phase, trigger to final states")
    parser.add_argument(
        "--phases",
        default="one,two",
        help="`one`, `two` or both: a long night's phases can run as separate calls (a device command "
        "lasts at most 10 minutes); a single phase is merged into an existing <out>/multi_gpu.json of "
        "the same night",
    )
    args = parser.parse_args()
    if args.gpus < 2:
        parser.error("--gpus has to be at least 2")
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - {"one", "two"}:
        parser.error(f"--phases takes one, two or one,two, not {args.phases!r}")
    model = args.model or ("tiny" if args.tiny else RANDOM_FULL_SIZE)
    height, width, frames = (64, 96, 9) if args.tiny else (480, 832, 81)
    args.out = args.out.resolve()
    work = args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    # The caller's environment without its Prefect or t2v settings: the base of the server's and workers'.
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "T2V_"))}
    results: dict = {
        "jobs": args.jobs,
        "resolution": f"{width}x{height}x{frames}",
        "steps": args.steps,
        "cap_gib": None if args.tiny else args.cap_gib,
        "gpus": args.gpus,
        "model": model,
        "gpu": gpu_names(base_env),
    }
    result_path = args.out / "multi_gpu.json"
    if set(phases) != {"one", "two"} and result_path.is_file():
        # The other phase, from an earlier call: kept when it measured the same night.
        earlier = json.loads(result_path.read_text())
        same = ("jobs", "resolution", "steps", "cap_gib", "gpus", "model")
        if all(earlier.get(k) == results[k] for k in same):
            for other in {"one", "two"} - set(phases):
                if other in earlier:
                    results[other] = earlier[other]

    def save() -> None:
        result_path.write_text(json.dumps(results, indent=1, default=str))

    if not args.tiny and (not isinstance(results["gpu"], list) or len(results["gpu"]) < args.gpus):
        results["error"] = f"needs {args.gpus} CUDA devices, found {results['gpu']}"
        save()
        raise SystemExit(results["error"])
    save()

    # A `timeout` (SIGTERM) unwinds like Ctrl+C, so the finally blocks stop the workers and the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server, prefect_env = start_server(work, base_env)
    try:
        # Prefect reads its settings when it is first imported: point this process at the server first.
        os.environ.update(prefect_env)
        from bench.night import has_ffmpeg

        no_ffmpeg = args.no_ffmpeg or not has_ffmpeg()
        results["no_ffmpeg"] = no_ffmpeg
        catalogue = work / "night.toml"
        templates = write_catalogue(
            catalogue, args.jobs, height=height, width=width, frames=frames, steps=args.steps
        )
        results["templates"] = templates

        pythonpath = [str(ROOT)]
        extra: dict[str, str] = {}
        if no_ffmpeg:
            site = work / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            pythonpath.insert(0, str(site))
            extra["T2V_BENCH_NO_FFMPEG"] = "1"
            results["note"] = "no ffmpeg: frames saved as .npy and published as the clips, no H.264"
        if base_env.get("PYTHONPATH"):
            pythonpath.append(base_env["PYTHONPATH"])
        worker_env = (
            {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
            | base_env
            | prefect_env
            | extra
            | {
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(pythonpath),
            }
        )
        if not args.tiny:
            worker_env["T2V_VRAM_BUDGET_GB"] = str(args.cap_gib)

        results["server_ready_s"] = wait_for_server(
            prefect_env["PREFECT_API_URL"], server, work / "server.log"
        )
        log(f"prefect server up at {prefect_env['PREFECT_API_URL']} in {results['server_ready_s']:.1f} s")

        from deployments.deploy import NightlyDeployment, deploy

        deploy(NightlyDeployment(catalogue=catalogue, model=model, pool=POOL, gpus=args.gpus, timezone="UTC"))
        log(f"deployed {DEPLOYMENT} on pool {POOL}: {args.jobs} job(s) of {results['resolution']} on {model}")

        results["import_probe"] = import_probe(worker_env)
        log(f"a flow-run process's start and imports: {results['import_probe']}")

        phase = dict(work=work, worker_env=worker_env, templates=templates, timeout_s=args.timeout_s)
        shards = {"one": [None], "two": [f"{i}/{args.gpus}" for i in range(args.gpus)]}
        for name in phases:
            results[name] = done = run_phase(name, shards[name], **phase)
            save()
            log(f"{name}: {done.get('clips')} clip(s) in {done.get('wall_s')} s, ok {done['completed']}")
        one, two = results.get("one"), results.get("two")
        if one and two:

            def ratio(key: str) -> float | None:
                a, b = one.get(key), two.get(key)
                return b / a if a and b else None

            results["scaling_wall"] = ratio("clips_per_hour_wall")
            results["scaling_steady"] = ratio("clips_per_hour_steady")
            results["no_job_twice"] = one["no_job_twice"] and two["no_job_twice"]
        if not all(results[name]["completed"] for name in phases):
            results["server_log_tail"] = tail(work / "server.log")
        save()
    except BaseException as exc:
        what = "interrupted (SIGTERM or Ctrl+C)" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
        results["error"] = f"{what}: {exc}"[:4000]
        results["server_log_tail"] = tail(work / "server.log")
        save()
        raise
    finally:
        stop(server)
    print_table(results)
    print(f"\nwrote {result_path}")


if __name__ == "__main__":
    main()
