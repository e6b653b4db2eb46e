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

tests/test_bench.py runs the smoke run on its session's Prefect server (`--prefect-api`), without the
import probe (`--no-import-probe`), and its second call (`--phases two`) on the night the first deployed
there (`--reuse-deployment`).

With `--tiny` the "GPUs" are just two worker processes (CUDA_VISIBLE_DEVICES is set all the same).
Where there is no ffmpeg binary (the GPU machine), or with `--no-ffmpeg`, the flow-run processes save
lossless frames as .npy and "encode" a clip by copying those frames: the workers' environment has
`T2V_HOOKS=bench.night:gpu_machine_hooks`, which hands every run of a flow-run process that codec (the
published .mp4 files then hold .npy data, which the JSON counts).
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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.multi_gpu_phase import DEPLOYMENT, POOL, run_phase  # noqa: E402
from bench.night import (  # noqa: E402
    GPU_MACHINE_HOOKS,
    NEGATIVE,
    log,
    night_templates,
    prefect_server,
    stop,
    tail,
    wait_for_server,
    without_run_settings,
)

RANDOM_FULL_SIZE = "wan2.2-ti2v-5b-random"  # t2v.models.registry.RANDOM_FULL_SIZE, without importing torch
PHASES = ("one", "two")
SAME_NIGHT = ("jobs", "resolution", "steps", "cap_gib", "gpus", "model")


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
    for name, prompt, seed in night_templates(count, takes=True):
        values = {
            "prompt": prompt,
            "negative_prompt": NEGATIVE,
            "seed": seed,
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


def print_table(results: dict) -> None:
    def num(v, fmt: str = ".1f") -> str:
        return format(v, fmt) if isinstance(v, int | float) else "-"

    head = f"{'phase':<6}{'workers':>8}{'clips':>6}{'wall s':>9}{'clips/h':>9}{'span s':>9}{'steady/h':>10}"
    print(f"\n{head}  split")
    for name in PHASES:
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
    for name in PHASES:
        for r in (results.get(name) or {}).get("runs", []):
            print(
                f"{name:<6}{r['worker'] or '?':<7}{r['shard'] or 'all':<7}{r['state'] or '?':<11}"
                f"{num(r['span_s']):>8}{num(r['before_first_stage_s']):>8}"
                f"{num(r['peak_reserved_gib'], '.2f'):>7}{num(r['peak_nvml_gib'], '.2f'):>7}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
        "--prefect-api",
        metavar="URL",
        help="deploy to and run on this Prefect server, already running (a test session's), instead of "
        "starting one; what the night leaves on it (pool, deployment, `gpu` limit) stays",
    )
    parser.add_argument(
        "--reuse-deployment",
        action="store_true",
        help="with --prefect-api, a night the server already has deployed as this call would deploy it "
        "(by an earlier call on it) is used as it is, not deployed again",
    )
    parser.add_argument(
        "--no-import-probe",
        action="store_true",
        help="leave out the timing of a flow-run process's start and imports (a smoke run)",
    )
    parser.add_argument(
        "--phases",
        default="one,two",
        help="`one`, `two` or both: a long night's phases can run as separate calls (a device command "
        "lasts at most 10 minutes); a single phase is merged into an existing <out>/multi_gpu.json of "
        "the same night",
    )
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error("--gpus has to be at least 2")
    if args.reuse_deployment and not args.prefect_api:
        parser.error("--reuse-deployment is for a server already running (--prefect-api)")
    args.phase_list = [p for p in args.phases.split(",") if p]
    if not args.phase_list or set(args.phase_list) - set(PHASES):
        parser.error(f"--phases takes one, two or one,two, not {args.phases!r}")
    args.model = args.model or ("tiny" if args.tiny else RANDOM_FULL_SIZE)
    args.out = args.out.resolve()
    args.work = args.work.resolve()
    return args


def dimensions(args: argparse.Namespace) -> tuple[int, int, int]:
    """(height, width, frames) of every job."""
    return (64, 96, 9) if args.tiny else (480, 832, 81)


def night_header(args: argparse.Namespace) -> dict:
    """The night's settings (the `gpu` names are added when known: `main`, `run_night`)."""
    height, width, frames = dimensions(args)
    return {
        "jobs": args.jobs,
        "resolution": f"{width}x{height}x{frames}",
        "steps": args.steps,
        "cap_gib": None if args.tiny else args.cap_gib,
        "gpus": args.gpus,
        "model": args.model,
    }


def merge_earlier(results: dict, path: Path, phases: list[str]) -> None:
    """The other phase, from an earlier call: kept when it measured the same night."""
    if set(phases) == set(PHASES) or not path.is_file():
        return
    earlier = json.loads(path.read_text())
    if all(earlier.get(k) == results[k] for k in SAME_NIGHT):
        for other in set(PHASES) - set(phases):
            if other in earlier:
                results[other] = earlier[other]


def worker_environment(
    args: argparse.Namespace, base_env: dict[str, str], prefect_env: dict[str, str], *, no_ffmpeg: bool
) -> dict[str, str]:
    """The workers' (and so their flow runs') environment: the server, the repository on the path and,
    without ffmpeg, the hooks that give their runs the .npy codec."""
    pythonpath = [str(ROOT)] + ([base_env["PYTHONPATH"]] if base_env.get("PYTHONPATH") else [])
    env = (
        {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
        | base_env
        | prefect_env
        | {
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(pythonpath),
        }
    )
    if no_ffmpeg:
        env["T2V_HOOKS"] = GPU_MACHINE_HOOKS
    if not args.tiny:
        env["T2V_VRAM_BUDGET_GB"] = str(args.cap_gib)
    return env


def scaling(results: dict) -> None:
    one, two = results.get("one"), results.get("two")
    if not (one and two):
        return

    def ratio(key: str) -> float | None:
        a, b = one.get(key), two.get(key)
        return b / a if a and b else None

    results["scaling_wall"] = ratio("clips_per_hour_wall")
    results["scaling_steady"] = ratio("clips_per_hour_steady")
    results["no_job_twice"] = one["no_job_twice"] and two["no_job_twice"]


def deployed_already(args: argparse.Namespace, catalogue: Path) -> bool:
    """Whether the server has the night deployed as `deploy_night` deploys it: the deployment on the
    pool with this catalogue and model, one schedule per shard, and the `gpu` limits at `--gpus`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from deployments.deploy import GPU_LIMIT

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            return False
    runs_at_once = deployment.global_concurrency_limit
    return (
        deployment.work_pool_name == POOL
        and deployment.parameters == {"catalogue": str(catalogue), "model": args.model}
        and sorted(s.parameters.get("shard") for s in deployment.schedules)
        == sorted(f"{i}/{args.gpus}" for i in range(args.gpus))
        and runs_at_once is not None
        and runs_at_once.limit == limit.limit == args.gpus
    )


def deploy_night(args: argparse.Namespace, results: dict, work: Path) -> Path:
    """The night's catalogue and its deployment, as `t2v deploy --gpus` makes it (`--reuse-deployment`:
    unless an earlier call made it so on the same server)."""
    from deployments.deploy import NightlyDeployment, deploy

    catalogue = work / "night.toml"
    height, width, frames = dimensions(args)
    results["templates"] = write_catalogue(
        catalogue, args.jobs, height=height, width=width, frames=frames, steps=args.steps
    )
    if args.reuse_deployment and deployed_already(args, catalogue):
        results["deployment"] = "found as this call deploys it (--reuse-deployment)"
        log(f"{DEPLOYMENT} on pool {POOL}: already deployed for this night")
        return catalogue
    results["deployment"] = "deployed"
    deploy(
        NightlyDeployment(catalogue=catalogue, model=args.model, pool=POOL, gpus=args.gpus, timezone="UTC")
    )
    log(
        f"deployed {DEPLOYMENT} on pool {POOL}: {args.jobs} job(s) of {results['resolution']} on {args.model}"
    )
    return catalogue


def run_night(args, results: dict, save, server, base_env, prefect_env, gpus: Future) -> None:
    """With the server started: deploy, then each phase asked for (saved after each). `gpus`: the
    cards' names, still being asked for in a --tiny run."""
    from bench.night import has_ffmpeg

    work = args.work
    results["no_ffmpeg"] = no_ffmpeg = args.no_ffmpeg or not has_ffmpeg()
    if no_ffmpeg:
        results["note"] = "no ffmpeg: frames saved as .npy and published as the clips, no H.264"
    worker_env = worker_environment(args, base_env, prefect_env, no_ffmpeg=no_ffmpeg)
    results["server_ready_s"] = wait_for_server(
        prefect_env["PREFECT_API_URL"], server, work / "prefect" / "server.log"
    )
    log(f"prefect server up at {prefect_env['PREFECT_API_URL']} in {results['server_ready_s']:.1f} s")
    deploy_night(args, results, work)
    results["gpu"] = gpus.result()
    if not args.no_import_probe:
        results["import_probe"] = import_probe(worker_env)
        log(f"a flow-run process's start and imports: {results['import_probe']}")
    phase = dict(work=work, worker_env=worker_env, templates=results["templates"], timeout_s=args.timeout_s)
    shards = {"one": [None], "two": [f"{i}/{args.gpus}" for i in range(args.gpus)]}
    for name in args.phase_list:
        results[name] = done = run_phase(name, shards[name], **phase)
        save()
        log(f"{name}: {done.get('clips')} clip(s) in {done.get('wall_s')} s, ok {done['completed']}")
    scaling(results)
    if not all(results[name]["completed"] for name in args.phase_list):
        results["server_log_tail"] = tail(work / "prefect" / "server.log")
    save()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base_env = without_run_settings()
    # The cards' names come from a child that imports torch (seconds): a GPU run needs them before it
    # starts, a --tiny one has them asked for beside the server's start and the deploy.
    gpus = ThreadPoolExecutor(1).submit(gpu_names, base_env)
    results = night_header(args)
    result_path = args.out / "multi_gpu.json"
    merge_earlier(results, result_path, args.phase_list)

    def save() -> None:
        result_path.write_text(json.dumps(results, indent=1, default=str))

    if not args.tiny:
        results["gpu"] = gpus.result()
    if not args.tiny and (not isinstance(results["gpu"], list) or len(results["gpu"]) < args.gpus):
        results["error"] = f"needs {args.gpus} CUDA devices, found {results['gpu']}"
        save()
        raise SystemExit(results["error"])
    save()
    # A `timeout` (SIGTERM) unwinds like Ctrl+C, so the finally blocks stop the workers and the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server, prefect_env = prefect_server(args.work / "prefect", base_env, args.prefect_api)
    try:
        # Prefect reads its settings when it is first imported: point this process at the server first.
        os.environ.update(prefect_env)
        run_night(args, results, save, server, base_env, prefect_env, gpus)
    except BaseException as exc:
        what = "interrupted (SIGTERM or Ctrl+C)" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
        results["error"] = f"{what}: {exc}"[:4000]
        results["server_log_tail"] = tail(args.work / "prefect" / "server.log")
        save()
        raise
    finally:
        stop(server)
    print_table(results)
    print(f"\nwrote {result_path}")


if __name__ == "__main__":
    main()
