"""Few-step clips and LoRA nights on one card (issue 18, item 5), through the product's StageRunner.

Full-size random weights (`wan2.2-ti2v-5b-random`, built before anything is timed; each load clones
them from host memory), the card held to T2V_VRAM_BUDGET_GB=`--cap-gib` (8). Each run is a fresh
`StageRunner` with its own data folder (nothing skipped), driven as `flows/night.py` drives one: each
card stage's component prefetched while the stage before runs, a stage's jobs submitted together
(threads, as Prefect's tasks), each clip finished after its decode. Times from the runner's hooks
(bench/timeline.py), plans and peaks from the run-log rows.

- clips: a 3-step DMD clip (sampler dmd at 1000,757,522, guidance off: FastWan2.2's preset) per
  `--resolutions`, end to end. `total_s` is the run's wall time; `<stage>_s` each stage's span (card
  wait, placing its component, compute, write), with `place_s` and `compute_s` apart, and `steps_s`
  the part of the compute from a stage's first progress report to its last step. Of `--repeats`
  runs the last is reported (the first pays the process's warm-up), all totals in `runs_total_s`.
  Targets on an H200: 720P <= 20 s, 480P <= 6 s.
- dmd-night: a night of `--jobs` 3-step DMD clips per `--resolutions` (the prompts and seeds of
  bench/session.py's nights), stage-major as a night runs: each component placed once for all of them,
  so a clip's share of the night (`per_clip_s`) is what a catalogue pays per clip, where a one-clip
  run pays the page-locking of both models and the run's set-up for one. The stages' spans overlap
  (each clip is finished while the next is decoded), so they add up to more than `total_s`.
- lora: a night of `--jobs` x `--lora-steps` steps (model scheduler, CFG 5) at `--lora-size` without
  LoRA, then the same jobs and seeds with two random rank-`--lora-rank` files made here in diffusers'
  layout (every block's attention and FFN projections; shapes from the transformer on the meta device):
  job i takes file i % 2, so 3 jobs each, alternating. `lora_night_ratio` = with / without (target
  <= 1.05); the compile seconds of each night (it compiles where its steps pay, T2V_COMPILE) apart.

No ffmpeg on the GPU machine: there the runner gets the .npy codec (bench/night.py `gpu_machine_hooks`):
the decode stage writes .npy, not FFV1, and the finish stage publishes a copy instead of watermarking
and encoding H.264 (5.9 s per 480P clip of CPU work on the CI box, docs/benchmarks.md): `finish_codec`.

    python bench/few_step.py --out bench/results                # a GPU: bench/results/few_step.json
    python bench/few_step.py --phases lora --out bench/results  # one phase per command, merged
    python bench/few_step.py --phases dmd-night --resolutions 832x480x81 --out bench/results
    python bench/few_step.py --tiny --out /tmp/fewstep          # CPU smoke run, built-in model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import torch  # noqa: E402

from bench.night import NEGATIVE, PROMPTS, gpu_machine_hooks, has_ffmpeg, log  # noqa: E402
from bench.session import night_jobs  # noqa: E402
from bench.timeline import Timeline, label  # noqa: E402
from t2v import samplers  # noqa: E402
from t2v.engine import Hooks, StageRunner  # noqa: E402
from t2v.jobs import JobSpec  # noqa: E402
from t2v.lora import Lora  # noqa: E402
from t2v.models import registry  # noqa: E402
from t2v.pipeline import Stage, diffuse, stages  # noqa: E402
from t2v.settings import Settings  # noqa: E402

RESULTS = "few_step.json"
CLIP_FIELDS = ("resolution", "steps", "total_s", *(f"{s.name}_s" for s in stages()), "other_s")
"""A clip's figures that the script prints at its end (the issue's, and the rest of `total_s`)."""
DMD = dict(sampler="dmd", timesteps=samplers.FASTWAN.timesteps, guidance=1.0, negative_prompt=NEGATIVE)
"""FastWan2.2's preset (`samplers.FASTWAN`): the 3-step clips' sampler."""
TARGETS_S = {"1280x704x121": 20.0, "832x480x81": 6.0}
LORA_TARGET = 1.05
LORA_SCALES = (1.0, 0.8)
LORA_LAYERS = (
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
    *("ffn.net.0.proj", "ffn.net.2"),
)
"""The layers of each block the random LoRA files adapt: what Wan LoRA trainers target."""
PHASES = ("clips", "dmd-night", "lora")
DEFAULTS = dict(resolutions="1280x704x121,832x480x81", repeats=2, jobs=6, lora_steps=50)
DEFAULTS |= dict(lora_size="832x480x81", lora_rank=64)
TINY_DEFAULTS = dict(
    resolutions="96x64x9,64x32x5", repeats=1, jobs=2, lora_steps=2, lora_size="96x64x9", lora_rank=4
)
"""`--tiny`: the built-in model's sizes, 2 jobs of 2 steps, rank 4 (its layers are 24 to 32 wide)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/t2v-few-step"))
    parser.add_argument("--tiny", action="store_true", help="built-in model on the CPU: a smoke run")
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    parser.add_argument("--resolutions", help="WxHxF list (default 1280x704x121,832x480x81)")
    parser.add_argument("--repeats", type=int, help="runs per clip, the last reported (default 2)")
    parser.add_argument("--jobs", type=int, help="jobs per DMD and LoRA night (default 6)")
    parser.add_argument("--lora-steps", type=int, help="steps per job of the LoRA nights (default 50)")
    parser.add_argument("--lora-size", help="WxHxF of the LoRA nights (default 832x480x81)")
    parser.add_argument("--lora-rank", type=int, help="rank of the random LoRA files (default 64)")
    parser.add_argument(
        "--lora-sides",
        default="without,with",
        help="the LoRA phase's nights: without,with (the ratio needs both; one alone is for a short run)",
    )
    given = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if given.tiny else DEFAULTS
    args = argparse.Namespace(**(defaults | {k: v for k, v in vars(given).items() if v is not None}))
    args.phases = [p for p in args.phases.split(",") if p]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases takes {','.join(PHASES)}")
    if not args.lora_sides or set(args.lora_sides.split(",")) - {"without", "with"}:
        parser.error("--lora-sides takes without,with")
    args.model = registry.BUILTIN if args.tiny else registry.RANDOM_FULL_SIZE
    args.cuda = torch.cuda.is_available() and not args.tiny
    return args


def size(text: str) -> dict[str, int]:
    width, height, frames = (int(v) for v in text.split("x"))
    return {"width": width, "height": height, "frames": frames}


def free() -> None:
    """Between runs: what the last one dropped collected, the CUDA and page-locked caches emptied."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()


def _chain(runner: StageRunner, chain: list[Stage], job: JobSpec, failed: dict[str, str]) -> None:
    """`chain`'s stages of one job in order, as a flow's task (and, after the last card stage, the clip's
    off-card stages) runs them; a failure is the job's, as in flows/night.py."""
    for stage in chain:
        try:
            runner.run(stage, job)
        except Exception as exc:
            failed[job.template] = f"{stage.name}: {type(exc).__name__}: {exc}"
            log(f"{stage.name} {job.template}: failed: {failed[job.template]}")
            return


def run_night(name: str, jobs: list[JobSpec], args: argparse.Namespace) -> dict:
    """`jobs` through the pipeline on one fresh StageRunner in `<work>/<name>`, in flows/night.py's order;
    the run's wall time, the timeline's buckets and events, and its run-log rows."""
    from t2v.context import check_budgets, check_jobs, start_run

    data = args.work / name
    shutil.rmtree(data, ignore_errors=True)
    os.environ["T2V_DATA_DIR"] = str(data)
    settings = Settings.from_env()
    ref = registry.resolve_model(args.model)
    check_jobs(jobs, ref)  # what a flow checks before it starts: the LoRA files against the model too
    check_budgets(jobs, ref, settings)
    timeline = Timeline()
    listening = Hooks(on_event=(timeline.on_event,), on_progress=(timeline.on_progress,))
    hooks = listening + (Hooks() if has_ffmpeg() else gpu_machine_hooks())
    on_card = [s for s in stages() if s.on_card]
    off_card = [s for s in stages() if not s.on_card]
    failed: dict[str, str] = {}
    start = timeline.t0 = time.perf_counter()
    kind = "generate" if len(jobs) == 1 else "nightly"  # the run-log row's kind, as the flows name it
    ctx = start_run(kind, jobs, settings=settings, model=args.model, outputs_dir=settings.outputs_dir)
    runner = StageRunner(ctx, hooks=hooks)
    with runner.live, runner.residency.held(), ThreadPoolExecutor(len(jobs), thread_name_prefix=name) as pool:
        for i, stage in enumerate(on_card):
            for ahead in on_card[i : i + 2]:  # this stage's component (the first waits), the next's
                runner.prefetch(ahead, jobs)
            chain = [stage, *off_card] if stage is on_card[-1] else [stage]
            todo = [j for j in jobs if j.template not in failed]
            for future in [pool.submit(_chain, runner, chain, job, failed) for job in todo]:
                future.result()
    if args.cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    timeline.finish(end)
    runner.runlog.finish_run(ctx.run_id, status="failed" if failed else "ok")
    keep = ("stage", "template", "status", "plan", "wall_s", "peak_reserved_gib")
    rows = [{k: r[k] for k in keep} for r in runner.runlog.run(ctx.run_id)["stages"]]
    log(f"{name}: {end - start:.2f} s, {len(jobs) - len(failed)} of {len(jobs)} clips")
    return {
        "wall_s": end - start,
        "clips": len(jobs) - len(failed),
        "failed": failed,
        "compiled": runner.compile_blocks,
        "compute_s": timeline.seconds,
        "calls": timeline.calls,
        "events": timeline.events,
        "rows": rows,
    }


def clip_record(run: dict) -> dict:
    """Where one clip's time went: each stage's span in the run (card wait, placing, compute, write),
    its placing and compute apart, the plans and peaks its rows name."""
    seconds, ok = run["compute_s"], [r for r in run["rows"] if r["status"] == "ok"]
    record = {"total_s": run["wall_s"]}
    record |= {f"{s.name}_s": seconds.get(f"stage_{label(s)}", 0.0) for s in stages()}
    record["other_s"] = run["wall_s"] - sum(record[f"{s.name}_s"] for s in stages())
    # Of that, the run's set-up before its first stage and its release of what it loaded after the last.
    record["before_stages_s"] = seconds.get("flow_before_stages", 0.0)
    record["after_stages_s"] = seconds.get("flow_after_stages", 0.0)
    record["place_s"] = {s.name: seconds.get(f"apply_{label(s)}", 0.0) for s in stages() if s.on_card}
    record["compute_s"] = {s.name: seconds.get(label(s), 0.0) for s in stages()}
    # Of the compute, the steps alone (the diffusion's, the decoder's passes): the rest is around them.
    record["steps_s"] = {
        s.name: seconds[f"steps_{label(s)}"] for s in stages() if f"steps_{label(s)}" in seconds
    }
    record["plans"] = {r["stage"]: r["plan"] for r in ok}
    record["peak_reserved_gib"] = {r["stage"]: r["peak_reserved_gib"] for r in ok}
    record["oom_attempts"] = [f"{r['stage']}:{r['plan']}" for r in run["rows"] if r["status"] == "failed"]
    record["failed"] = run["failed"]
    return record


def clips_phase(args: argparse.Namespace) -> list[dict]:
    """A 3-step DMD clip per resolution, end to end, `--repeats` times each on fresh runners."""
    rules = registry.resolve_model(args.model).rules
    records = []
    for res in args.resolutions.split(","):
        job = JobSpec(template=f"dmd-{res}", prompt=PROMPTS[3][1], seed=1, **size(res), **DMD)
        job = samplers.resolve(job, rules)
        runs = []
        for n in range(args.repeats):
            runs.append(run_night(f"clip-{res}-{n}", [job], args))
            free()
        record = {"resolution": res, "steps": job.steps, "sampler": job.sampler, "timesteps": job.timesteps}
        record |= clip_record(runs[-1]) | {"runs_total_s": [r["wall_s"] for r in runs]}
        if res in TARGETS_S:
            record |= {"target_s": TARGETS_S[res], "within_target": record["total_s"] <= TARGETS_S[res]}
        records.append(record)
        shown = ("total_s", *(f"{s.name}_s" for s in stages()))
        log(f"clip {res}: " + ", ".join(f"{k} {record[k]:.2f}" for k in shown))
    return records


def dmd_night_phase(args: argparse.Namespace) -> list[dict]:
    """A night of `--jobs` DMD clips per resolution on one fresh runner: its stages' spans, and each
    clip's share of its wall time."""
    rules = registry.resolve_model(args.model).rules
    records = []
    for res in args.resolutions.split(","):
        plain = night_jobs(args.jobs, steps=3, **size(res))
        jobs = [samplers.resolve(replace(job, **DMD), rules) for job in plain]
        run = run_night(f"dmd-night-{res}", jobs, args)
        free()
        record = {"resolution": res, "jobs": len(jobs), "steps": jobs[0].steps} | clip_record(run)
        # A night's stages overlap (a clip is finished while the next is decoded): spans, no remainder.
        del record["other_s"]
        share = record["per_clip_s"] = run["wall_s"] / max(run["clips"], 1)
        if res in TARGETS_S:
            within = not run["failed"] and share <= TARGETS_S[res]
            record |= {"target_s": TARGETS_S[res], "within_target": within}
        records.append(record)
        log(f"DMD night {res}: {run['wall_s']:.2f} s for {run['clips']} clips, {share:.2f} s a clip")
    return records


def make_lora(ref: registry.ModelRef, folder: Path, *, rank: int, seed: int) -> Path:
    """A random rank-`rank` LoRA file of the model's transformer in diffusers' layout (what
    `WanPipeline.save_lora_weights` writes of peft's state dict), bf16; shapes from the transformer
    built on the meta device, so no weights are loaded for it."""
    from diffusers import WanPipeline

    skeleton = registry.skeleton(ref, "transformer")
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, block in enumerate(skeleton.blocks):
        for name in LORA_LAYERS:
            linear = block.get_submodule(name)
            down = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=gen) * 0.01
            layers[f"blocks.{i}.{name}.lora_A.weight"] = down.to(torch.bfloat16)
            layers[f"blocks.{i}.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


def diffusions(run: dict) -> list[float]:
    """Each job's diffuse compute (placing excluded), in the order they ran."""
    events = sorted(run["events"], key=lambda e: e[2])
    return [end - start for bucket, _, start, end in events if bucket == label(diffuse.STAGE)]


def compile_excess(run: dict) -> float:
    """What compiling cost a compiled night: the diffusions' time beyond the median one's, counting those
    over it by more than 10% (bench/timeline.py's `compile_seconds` counts only the first job's; a LoRA
    night recompiles for each new set of active adapters, which `set_adapters` changes under Dynamo's
    guards: its first job of each file)."""
    took = diffusions(run)
    if not run["compiled"] or len(took) < 2:
        return 0.0
    median = statistics.median(took)
    return sum(t - median for t in took if t > 1.1 * median)


def night_summary(run: dict) -> dict:
    """A LoRA-phase night in short: wall time, compile, diffuse compute, plans, OOM attempts, peak."""
    rows, seconds, diffuse_label = run["rows"], run["compute_s"], label(diffuse.STAGE)
    peaks = [r["peak_reserved_gib"] for r in rows if r["peak_reserved_gib"] is not None]
    night = {k: run[k] for k in ("wall_s", "clips", "failed", "compiled")}
    night |= {"compile_s": compile_excess(run), "diffuse_job_s": diffusions(run)}
    night |= {"diffuse_compute_s": seconds.get(diffuse_label, 0.0)}
    night |= {"diffuse_place_s": seconds.get(f"apply_{diffuse_label}", 0.0)}
    night["diffuse_plans"] = sorted({r["plan"] for r in rows if r["stage"] == diffuse.STAGE.name})
    night["oom_attempts"] = [f"{r['stage']}:{r['plan']}" for r in rows if r["status"] == "failed"]
    return night | {"peak_reserved_gib": max(peaks, default=None), "rows": rows}


def lora_phase(args: argparse.Namespace) -> dict:
    """The night without LoRA, then the same night with the two files (`LORA_SCALES`): their ratio."""
    ref = registry.resolve_model(args.model)
    plain = night_jobs(args.jobs, steps=args.lora_steps, **size(args.lora_size))
    files = [make_lora(ref, args.work / "loras" / f"style{n}", rank=args.lora_rank, seed=n) for n in (1, 2)]
    picks = [(files[i % 2], LORA_SCALES[i % 2]) for i in range(len(plain))]
    styled = [replace(job, lora=(Lora(str(f), scale),)) for job, (f, scale) in zip(plain, picks, strict=True)]
    sides = {"without": plain, "with": styled}
    nights = {}
    for side in args.lora_sides.split(","):
        nights[side] = night_summary(run_night(f"lora-{side}", sides[side], args))
        free()
    without, with_lora = nights.get("without"), nights.get("with")
    if without is None or with_lora is None:
        return {"lora_night_ratio": None, "lora_night": {"size": args.lora_size, **nights}}
    ratio = with_lora["wall_s"] / without["wall_s"]
    log(f"LoRA night: {with_lora['wall_s']:.1f} s against {without['wall_s']:.1f} s: {ratio:.3f}x")
    night = {
        "jobs": args.jobs,
        "steps": args.lora_steps,
        "resolution": args.lora_size,
        "rank": args.lora_rank,
    }
    night |= {"guidance": plain[0].guidance, "layers": LORA_LAYERS}
    night["lora_fuse"] = Settings.from_env().lora_fuse  # t2v/lora_fuse.py: folded, or peft's forward
    night["files_mb"] = [f.stat().st_size / 1e6 for f in files]
    night["layout"] = [f"{f.parent.name}:{scale}" for f, scale in picks]
    night["order"] = "the night without first, then with: same prompts and seeds"
    night |= {"target": LORA_TARGET, "within_target": ratio <= LORA_TARGET}
    night["ratio_excluding_compile"] = (with_lora["wall_s"] - with_lora["compile_s"]) / (
        without["wall_s"] - without["compile_s"]
    )
    night["diffuse_compute_ratio"] = with_lora["diffuse_compute_s"] / without["diffuse_compute_s"]
    return {"lora_night_ratio": ratio, "lora_night": night | {"without": without, "with": with_lora}}


def header(args: argparse.Namespace) -> dict:
    return {
        "gpu": torch.cuda.get_device_name(0) if args.cuda else "cpu",
        "cap_gib": args.cap_gib if args.cuda else None,
        "torch": torch.__version__,
        "model": args.model,
        "finish_codec": "ffmpeg" if has_ffmpeg() else "npy",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS
    # A run of some phases keeps the others' figures of an earlier run on the same card.
    merged = json.loads(path.read_text()) if path.exists() and set(args.phases) != set(PHASES) else {}
    results = header(args)
    if merged.get("gpu") == results["gpu"]:
        results = {k: v for k, v in merged.items() if k not in results} | results
    if args.cuda:
        from bench.gpu_runner import build_random_weights

        os.environ["T2V_VRAM_BUDGET_GB"] = str(args.cap_gib)
        build_random_weights()  # before anything is timed: the registry keeps them on the host
    if "clips" in args.phases:
        results["clips"] = clips_phase(args)
        path.write_text(json.dumps(results, indent=1, default=str))
    if "dmd-night" in args.phases:
        results["dmd_nights"] = dmd_night_phase(args)
        path.write_text(json.dumps(results, indent=1, default=str))
    if "lora" in args.phases:
        results |= lora_phase(args)
        path.write_text(json.dumps(results, indent=1, default=str))
    brief = {k: v for k, v in results.items() if k != "lora_night"}
    brief["clips"] = [{k: v for k, v in c.items() if k in CLIP_FIELDS} for c in results.get("clips", [])]
    night_fields = (*CLIP_FIELDS, "jobs", "per_clip_s")  # a night has no other_s
    brief["dmd_nights"] = [
        {k: v for k, v in n.items() if k in night_fields} for n in results.get("dmd_nights", [])
    ]
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
