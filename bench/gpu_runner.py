"""The product's stage runner on a GPU: plans, fallbacks, peaks and run-log rows, with no Prefect.

Part 1, the tiny model on CUDA with out-of-memory injected into the fast plans, so that every stage
falls back through the ladder (group offloading with CUDA streams included) and both attempts land in
the run log. Part 2, the full-size architecture with random weights (`--model wan2.2-ti2v-5b-random`)
under an 8 GiB cap: two 832x480x81 jobs, stage-major as the nightly flow runs them, so the second job
reuses the components the first one loaded. Prints the run log's rows.

    python bench/gpu_runner.py --out bench/results          # on a GPU (the device tool)

Where the GPU machine has no ffmpeg binary, the runner is handed the .npy codec (`bench.night`): the
lossless frames are written as .npy under the store's .mkv name and the finish stage publishes a copy
of them; every GPU-side step is the product's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.night import gpu_machine_hooks, has_ffmpeg  # noqa: E402
from t2v.context import start_run  # noqa: E402
from t2v.engine import Hooks, StageRunner  # noqa: E402
from t2v.jobs import JobSpec  # noqa: E402
from t2v.models.registry import COMPONENTS, RANDOM_FULL_SIZE, load_component, resolve_model  # noqa: E402
from t2v.pipeline import decode, diffuse, encode, stages  # noqa: E402
from t2v.settings import Settings  # noqa: E402
from t2v.vram import probe  # noqa: E402

GiB = 2**30
FAST_PLANS = {encode.STAGE: "gpu", diffuse.STAGE: "gpu-*", decode.STAGE: "gpu-fp32-whole"}
INJECT = ",".join(f"{stage.name}:{plans}" for stage, plans in FAST_PLANS.items())
"""$T2V_INJECT_OOM of part 1: the fastest plans of each card stage run out of memory."""


def run_night(
    data: Path, model: str, jobs: list[JobSpec], *, budget_gib: float | None, inject: str = ""
) -> list:
    """The jobs' stages, stage-major as flows/night.py orders them, on one runner; the run's rows."""
    settings = Settings(data_dir=data, inject_oom=inject, vram_budget_gib=budget_gib)
    ctx = start_run("nightly", jobs, settings=settings, model=model, outputs_dir=settings.outputs_dir)
    hooks = Hooks() if has_ffmpeg() else gpu_machine_hooks()
    runner = StageRunner(ctx, hooks=hooks, memory=probe(budget_gib=budget_gib))
    with runner.residency.held():
        for stage in stages():
            for job in jobs:
                start = time.perf_counter()
                runner.run(stage, job)
                print(f"{model} {stage.name} {job.template}: {time.perf_counter() - start:.1f} s", flush=True)
    runner.runlog.finish_run(ctx.run_id, status="ok")
    return runner.runlog.run(ctx.run_id)["stages"]


def build_random_weights() -> None:
    """The random weights, before the cap (fp32 init of the encoder needs 23 GB on the card); the
    registry keeps them in host memory and every load in the night clones them."""
    ref = resolve_model(RANDOM_FULL_SIZE)
    start = time.perf_counter()
    for component in COMPONENTS:
        load_component(ref, component)
    print(f"random full-size weights built in {time.perf_counter() - start:.1f} s", flush=True)


def full_size_night(work: Path, steps: int) -> list:
    build_random_weights()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(8 * GiB / total)
    jobs = [
        JobSpec(template=name, prompt=prompt, seed=seed, height=480, width=832, frames=81, steps=steps)
        for name, prompt, seed in [
            ("corgi", "A corgi in a red scarf runs through fresh snow at golden hour", 1),
            ("atom", "A glowing model of an atom rotates slowly above a classroom desk", 2),
        ]
    ]
    start = time.perf_counter()
    rows = run_night(work / "full", RANDOM_FULL_SIZE, jobs, budget_gib=8)
    print(f"full-size night: {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def print_rows(rows: dict[str, list]) -> None:
    header = f"{'night':<24}{'stage':<10}{'job':<8}{'status':<9}{'plan':<30}{'wall s':>8}"
    print(f"\n{header}{'alloc':>7}{'resv':>7}{'nvml':>7}")
    for night, night_rows in rows.items():
        for r in night_rows:
            cells = [r["wall_s"], r["peak_allocated_gib"], r["peak_reserved_gib"], r["peak_nvml_gib"]]
            nums = "".join(f"{v:>7.2f}" if v is not None else f"{'-':>7}" for v in cells[1:])
            print(
                f"{night:<24}{r['stage']:<10}{r['template']:<8}{r['status']:<9}{r['plan'] or '-':<30}"
                f"{cells[0] or 0:>8.2f}{nums}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/t2v-gpu-runner")
    shutil.rmtree(work, ignore_errors=True)
    tiny_jobs = [JobSpec(template="fox", prompt="a red fox in snow", height=64, width=96, frames=9, steps=3)]
    rows = {
        "tiny-cuda-fallbacks": run_night(work / "tiny", "tiny", tiny_jobs, budget_gib=None, inject=INJECT)
    }
    rows["random-full-480p-cap8"] = full_size_night(work, args.steps)
    (args.out / "gpu_runner.json").write_text(json.dumps(rows, indent=1, default=str))
    print_rows(rows)


if __name__ == "__main__":
    main()
