"""Nightly throughput on one GPU: t2v's nightly flow against the per-video diffusers loop a user writes.

One process, one card, one cap (8 GiB by `set_per_process_memory_fraction`), the same random-weight
full-size weights, prompts, negative prompt, seeds and steps on both sides:

  baseline  stock `WanPipeline` called once per video (bench/stock.py). First as the issue words it,
            `enable_model_cpu_offload()` + `vae.enable_tiling()`; where that cannot fit the cap (the
            10 GB transformer and 11 GB text encoder move whole), the loop diffusers' docs give for
            small cards: group offloading with CUDA streams (transformer by blocks, text encoder by
            leaves) and VAE tiling. Frames are saved per clip with `np.save`.
  ours      `flows.nightly.nightly` against a local `prefect server start` that this script starts
            first (a nightly deployment has its server running; `--prefect-api` names one already
            running instead, as the tests do with their session's): stage-major, planned under the
            same cap (T2V_VRAM_BUDGET_GB), run log and store included (bench/ours.py).

Reports clips/hour for both, their ratio, our time outside model compute (wall time minus each card
stage's "compute" spans less the "place" spans inside them, as the runner's hooks report them; the
compile inside the first compiled steps counted as outside; split into compile, loads and the rest:
Prefect, store and run-log I/O; bench/summary.py), the night's timeline with the card's holds
(`card_timeline_s`, bench/timeline.py) and each side's peak VRAM. Then, on the same card
(bench/probes.py): the step cache (FirstBlockCache) on one job, speed and relative change of its
latents against the uncached run, and `torch.compile` of the repeated transformer blocks from the
night's Inductor cache (compile time, step time). `--warm-compile` starts the night from such a cache,
as a second night does.

    python bench/nightly_throughput.py --out bench/results        # on a GPU (the device tool)
    python bench/nightly_throughput.py --tiny --out /tmp/bench    # CPU smoke run, built-in model

The GPU machine has no ffmpeg binary: there (and only there) both sides save frames as .npy and our
finish stage publishes those instead of encoding H.264 (the runner's codec hook, bench/night.py;
measured apart on a CPU: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.night import log, prefect_server, stop, wait_for_server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--tiny", action="store_true", help="built-in model on the CPU: a smoke run")
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of phases to leave out: model-offload,baseline,cache,compile,pin-probe",
    )
    parser.add_argument(
        "--warm-compile",
        action="store_true",
        help="before our night, compile the blocks once at its shapes (then reset Dynamo): the night "
        "starts with Inductor's on-disk cache of an earlier night, as a nightly schedule's second night does",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/t2v-throughput"))
    parser.add_argument(
        "--prefect-api",
        metavar="URL",
        help="run our night against this Prefect server, already running (a test session's), instead "
        "of starting one (then `prefect_server_ready_s` is only its health check)",
    )
    parser.add_argument(
        "--deadline-s", type=float, default=420, help="optional phases start only before this"
    )
    parser.add_argument(
        "--summarise", type=Path, metavar="JSON", help="recompute the headline figures of a results file"
    )
    return parser.parse_args(argv)


def headline(results: dict) -> str:
    return json.dumps({k: v for k, v in results.items() if k != "phases"}, indent=1, default=str)


def resummarise(path: Path) -> None:
    from bench.summary import summarise

    results = summarise(json.loads(path.read_text()))
    path.write_text(json.dumps(results, indent=1, default=str))
    print(headline(results))


def run_phases(s, server, server_log: Path) -> None:
    """Everything after the server's start, in order: ours first (it pays the process's warm-up)."""
    from bench import probes, stock
    from bench.ours import night_latents, ours_phase

    if s.cuda and "pin-probe" not in s.skip:
        s.results["pin_probe"] = probes.pin_probe(s.torch)
        log(f"pin probe: {s.results['pin_probe']}")
    stock.build_masters(s)
    s.results["prefect_server_ready_s"] = wait_for_server(os.environ["PREFECT_API_URL"], server, server_log)
    if s.args.warm_compile:
        s.results["phases"]["warm_compile"] = probes.warm_compile(s)
        log(f"warm compile: {s.results['phases']['warm_compile']}")
    ours_phase(s)
    latents = night_latents(s)
    probes.optional_phase(s, "cache", lambda: probes.step_cache_phase(s, latents))
    s.free()
    if "baseline" not in s.skip:  # left out: ours alone, at more steps than both sides fit in one command
        stock.baseline_phases(s)
    probes.optional_phase(s, "compile", lambda: probes.compile_phase(s))


def main() -> None:
    args = parse_args()
    if args.summarise:
        resummarise(args.summarise)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    # The server starts while the weights are built; it is up before anything is timed. Prefect reads
    # its settings when first imported: this process points at the server before that.
    home = args.work / "prefect"
    server, prefect_env = prefect_server(home, os.environ, args.prefect_api)
    os.environ.update(prefect_env)
    try:
        from bench.session import open_session

        s = open_session(args)
        run_phases(s, server, home / "server.log")
    finally:
        stop(server)
    print(headline(s.results))


if __name__ == "__main__":
    main()
