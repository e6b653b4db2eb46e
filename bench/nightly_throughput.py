"""Nightly throughput on one GPU: t2v's nightly flow against the per-video diffusers loop a user writes.

One process, one card, one cap (8 GiB by `set_per_process_memory_fraction`), the same random-weight
full-size weights, prompts, negative prompt, seeds and steps on both sides:

  baseline  stock `WanPipeline` called once per video. First as the issue words it,
            `enable_model_cpu_offload()` + `vae.enable_tiling()`; where that cannot fit the cap (the
            10 GB transformer and 11 GB text encoder move whole), the loop diffusers' docs give for
            small cards: group offloading with CUDA streams (transformer by blocks, text encoder by
            leaves) and VAE tiling. Frames are saved per clip with `np.save`.
  ours      `flows.nightly.nightly` against a local `prefect server start` that this script starts
            first (a nightly deployment has its server running): stage-major, planned under the same
            cap (T2V_VRAM_BUDGET_GB), run log and store included.

Reports clips/hour for both, their ratio, our time outside model compute (wall time minus the time
inside `stages.encode_texts` / `denoise` / `decode_latents`, the compile inside the first compiled
steps counted as outside; split into compile, loads and the rest: Prefect, store and run-log I/O), the
night's timeline with the card's holds (`card_timeline_s`) and each side's peak VRAM. Then, on the same
card: the step cache (FirstBlockCache) on one job, speed and relative change of its latents against the
uncached run, and `torch.compile` of the repeated transformer blocks from the night's Inductor cache
(compile time, step time). `--warm-compile` starts the night from such a cache, as a second night does.

    python bench/nightly_throughput.py --out bench/results        # on a GPU (the device tool)
    python bench/nightly_throughput.py --tiny --out /tmp/bench    # CPU smoke run, built-in model

The GPU machine has no ffmpeg binary: there (and only there) both sides save frames as .npy and our
watermark stage publishes those instead of encoding H.264 (measured apart on a CPU: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.night import (  # noqa: E402
    NEGATIVE,
    PROMPTS,
    frames_to_npy,
    free_port,
    has_ffmpeg,
    log,
    wait_for_server,
)

GiB = 2**30


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A local Prefect server for this process, as a nightly deployment has one; returns (proc, api)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    home.mkdir(parents=True, exist_ok=True)
    server_log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    os.environ.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    return proc, api


class ComputeTimer:
    """Wall time spent inside the model's compute functions (`t2v.stages`) and inside `plans.apply`
    (placing a loaded component: moving, pinning, hooking), with the device synchronised at both ends."""

    def __init__(self, torch) -> None:
        self.torch = torch
        self.seconds: dict[str, float] = {"encode": 0.0, "denoise": 0.0, "decode": 0.0, "apply": 0.0}
        self.calls: dict[str, int] = {}
        self.events: list[tuple[str, str, float, float]] = []
        """(bucket, thread, start, end) of every timed call, in seconds from `t0`: the night's timeline."""
        self.t0 = time.perf_counter()
        self._patched: list[tuple[object, str, object]] = []

    def _sync(self) -> None:
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def wrap(
        self, owner, name: str, bucket: str | Callable[[tuple], str | None], *, sync: bool = True
    ) -> None:
        """Time `owner.name` into `bucket`, or into `bucket(args)` (not at all where that is None);
        `sync=False` for what runs beside the compute (in the flow's task threads or the prefetch
        thread), which must not wait for the card."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if sync:
                self._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if sync:
                    self._sync()
                key = bucket(args) if callable(bucket) else bucket
                if key is not None:
                    end = time.perf_counter()
                    self.seconds[key] = self.seconds.get(key, 0.0) + end - start
                    self.calls[key] = self.calls.get(key, 0) + 1
                    self.event(key, start, end)

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))

    def event(self, key: str, start: float, end: float) -> None:
        self.events.append((key, threading.current_thread().name, start - self.t0, end - self.t0))

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()

    @property
    def compute_s(self) -> float:
        return self.seconds["encode"] + self.seconds["denoise"] + self.seconds["decode"]


class TimedLock:
    """The runner's card lock, recording each hold as a `card` event: when the card sat idle inside a
    stage, and how much of each hold was not compute, can then be read off the timeline."""

    def __init__(self, lock, timer: ComputeTimer) -> None:
        self._lock = lock
        self._timer = timer
        self._since = threading.local()

    def acquire(self, *args, **kwargs) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self._since.t = time.perf_counter()
        return got

    def release(self) -> None:
        self._timer.event("card", self._since.t, time.perf_counter())
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def card_timeline(events: list, stages: tuple[str, ...] = ("encode", "diffuse", "decode")) -> dict:
    """Per stage, from the timeline: where its wall time went around the card's holds.

    - before_first_hold: from the stage's start until a job first had the card (a component still
      being prefetched, task start-ups);
    - gaps: the card free between two holds inside the stage;
    - held_not_compute: holds minus the model compute inside them (run-log row, store reads, placing
      the component, moving the result off the card);
    - after_last_hold: the last job's write and the stage's tasks ending."""
    out = {}
    compute_key = {"encode": "encode", "diffuse": "denoise", "decode": "decode"}
    for stage in stages:
        window = [(s, e) for k, _, s, e in events if k == f"stage_{stage}"]
        if not window:
            continue
        begin, end = window[0]
        holds = sorted((s, e) for k, _, s, e in events if k == "card" and begin <= s <= end)
        compute = sum(e - s for k, _, s, e in events if k == compute_key[stage] and begin <= s <= end)
        if not holds:
            continue
        out[stage] = {
            "span_s": end - begin,
            "holds": len(holds),
            "before_first_hold_s": holds[0][0] - begin,
            "gaps_s": sum(max(0.0, b[0] - a[1]) for a, b in zip(holds, holds[1:], strict=False)),
            "held_not_compute_s": sum(e - s for s, e in holds) - compute,
            "after_last_hold_s": end - holds[-1][1],
        }
    return out


def pin_probe(torch, gib: float = 2.0) -> dict:
    """Seconds to pin `gib` of host memory with cudaHostAlloc and with the host-register path."""
    out = {}
    src = torch.empty(int(gib * GiB), dtype=torch.uint8)
    src.fill_(1)
    for name, setting in (("cudaHostAlloc", "False"), ("cudaHostRegister_8_threads", "True")):
        try:
            torch.cuda.memory._set_allocator_settings(f"pinned_use_cuda_host_register:{setting}")
            start = time.perf_counter()
            pinned = src.pin_memory()
            out[name + "_s"] = time.perf_counter() - start
            start = time.perf_counter()
            pinned.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            out[name + "_h2d_gb_s"] = gib * GiB / 1e9 / (time.perf_counter() - start)
            del pinned
            torch._C._host_emptyCache()
        except Exception as exc:
            out[name + "_error"] = f"{type(exc).__name__}: {exc}"
    torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True")
    return out


def compile_seconds(ours: dict) -> dict:
    """What `torch.compile` cost the night: the `compile_repeated_blocks` call, and the first compiled
    job's denoise beyond the median of the later ones (the same shapes: Dynamo traces and Inductor
    compiles inside the first steps). Counted as overhead, not model compute; zero where not compiled.
    (Runs before the night's timeline was recorded counted the first steps' compile as compute.)"""
    call = ours["compute_s"].get("compile_call", 0.0)
    timeline = sorted(ours.get("events", []), key=lambda event: event[2])
    denoises = [e - s for k, _, s, e in timeline if k == "denoise"]
    first = 0.0
    if ours["calls"].get("compile_call") and len(denoises) > 1:
        rest = sorted(denoises[1:])
        first = max(0.0, denoises[0] - rest[len(rest) // 2])
    return {"call": call, "first_steps": first, "total": call + first}


def summarise(results: dict) -> dict:
    """The headline figures, from the phases' raw records (also for an existing file: `--summarise`).

    Ours: wall time minus the time inside the model's compute functions is the overhead (the compute
    functions hold the card one at a time, so their times add up without overlap); the compile inside
    the first compiled steps is overhead too (`compile_seconds`). It is split into what the flow waited
    for, which adds up to it:
    - compile: `torch.compile` of the repeated blocks, where the run compiles (T2V_COMPILE);
    - loads: `plans.apply` on the stages' path (moving to the card, pinning, hooking); the prefetch
      thread's reading and pinning ran beside the stages and is reported apart (`prefetch_s`);
    - <stage>_tail: the rest of each stage's wall time, whose jobs run as tasks submitted together: what
      was not hidden behind another job's compute (the last output's write with its fsync, reads,
      run-log rows, task start-ups);
    - watermark_tail: the clips still being encoded after the last decode;
    - prefect_and_flow: the rest (Prefect's flow machinery, the flow's own steps).
    Peak reserved memory is the largest of the run-log rows: the runner resets PyTorch's peak counter at
    each stage, so a window around the whole flow sees only the last stage's."""
    ours = results["phases"].get("ours")
    if ours:
        wall, seconds = ours["wall_s"], ours["compute_s"]
        compile_s = compile_seconds(ours)
        compute = seconds["encode"] + seconds["denoise"] + seconds["decode"] - compile_s["first_steps"]
        results["ours_clips_per_hour"] = 3600 * ours["clips"] / wall
        results["ours_overhead_share"] = (wall - compute) / wall
        results["ours_overhead_share_excluding_compile"] = (wall - compute - compile_s["total"]) / wall
        results["ours_loads_share"] = seconds["apply"] / wall
        split = {"loads": seconds["apply"], "compile": compile_s["total"]}
        for stage, fn in (("encode", "encode"), ("diffuse", "denoise"), ("decode", "decode")):
            took = seconds.get(f"stage_{stage}", 0.0)
            split[f"{stage}_tail"] = took - seconds[fn] - seconds.get(f"apply_{stage}", 0.0)
        split["diffuse_tail"] -= compile_s["call"]
        split["watermark_tail"] = seconds.get("watermark_tail", 0.0)
        split["prefect_and_flow"] = wall - compute - sum(split.values())
        results["ours_overhead_s"] = split
        results["flow_parts_s"] = {k[5:]: v for k, v in seconds.items() if k.startswith("flow_")}
        results["prefetch_s"] = seconds.get("prefetch")
        results["pins"] = ours.get("pins")
        if ours.get("events"):
            results["card_timeline_s"] = card_timeline(ours["events"])
        peaks = [r["peak_reserved_gib"] for r in ours["rows"] if r.get("peak_reserved_gib") is not None]
        results["ours_peak_gib"] = max(peaks) if peaks else ours["peak_reserved_gib"]
        results["ours_peak_nvml_gib"] = ours["peak_nvml_gib"]
    base = results["phases"].get("baseline")
    if base:
        results["baseline_clips_per_hour"] = 3600 * base["clips"] / base["wall_s"]
        results["baseline_peak_gib"] = base["peak_reserved_gib"]
        results["baseline_peak_nvml_gib"] = base["peak_nvml_gib"]
    if ours and base:
        results["ratio"] = results["ours_clips_per_hour"] / results["baseline_clips_per_hour"]
    return results


def main() -> None:
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
        "--deadline-s", type=float, default=420, help="optional phases start only before this"
    )
    parser.add_argument(
        "--summarise", type=Path, metavar="JSON", help="recompute the headline figures of a results file"
    )
    args = parser.parse_args()
    if args.summarise:
        results = summarise(json.loads(args.summarise.read_text()))
        args.summarise.write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps({k: v for k, v in results.items() if k != "phases"}, indent=1, default=str))
        return
    skip = {s for s in args.skip.split(",") if s}
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    # The server starts while the weights are built; it is up before anything is timed.
    server, api = start_prefect_server(args.work / "prefect")

    import numpy as np
    import torch

    import t2v  # noqa: F401  (its allocator settings, before CUDA starts)
    from t2v import stages
    from t2v.jobs import JobSpec
    from t2v.models import registry
    from t2v.models.registry import RANDOM_FULL_SIZE, resolve_model
    from t2v.settings import get_settings
    from t2v.vram import PeakMemory

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda:0" if cuda else "cpu"
    began = time.perf_counter()
    model = "tiny" if args.tiny else RANDOM_FULL_SIZE
    height, width, frames = (64, 96, 9) if args.tiny else (480, 832, 81)
    ref = resolve_model(model)
    results: dict = {
        "jobs": args.jobs,
        "resolution": f"{width}x{height}x{frames}",
        "steps": args.steps,
        "cap_gib": args.cap_gib if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "model": model,
        "phases": {},
    }

    def save() -> None:
        (args.out / "nightly_throughput.json").write_text(json.dumps(results, indent=1, default=str))

    if not has_ffmpeg():
        frames_to_npy()
        results["note"] = "no ffmpeg on this machine: frames saved as .npy on both sides, no H.264"

    jobs = []
    for i in range(args.jobs):
        name, prompt = PROMPTS[i % len(PROMPTS)]
        jobs.append(
            JobSpec(
                template=name if i < len(PROMPTS) else f"{name}-{i}",
                prompt=prompt,
                negative_prompt=NEGATIVE,
                seed=i + 1,
                height=height,
                width=width,
                frames=frames,
                steps=args.steps,
            )
        )

    if cuda and "pin-probe" not in skip:
        results["pin_probe"] = pin_probe(torch)
        log(f"pin probe: {results['pin_probe']}")
    start = time.perf_counter()
    masters = {
        "text_encoder": registry.load_text_encoder(ref),
        "transformer": registry.load_transformer(ref),
        "vae": registry.load_vae(ref),
    }
    results["build_s"] = time.perf_counter() - start
    log(f"weights built in {results['build_s']:.1f} s")
    results["prefect_server_ready_s"] = wait_for_server(api, server, args.work / "prefect" / "server.log")
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 0

    def cap(on: bool) -> None:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total if on else 1.0)
            torch.cuda.reset_peak_memory_stats()

    # Between phases: the runner's components and, by its garbage collection, the baseline's dropped
    # pipeline; the CUDA and page-locked caches are emptied, so no side inherits the other's blocks.
    from t2v.runner import release_components as drop_everything

    def transformer_for_night():
        """The transformer placed by the plan the night used for its diffuse stage."""
        from t2v.plans import ComponentSizes, apply, choose, ladder
        from t2v.vram import probe

        sizes = ComponentSizes.from_modules(transformer=registry.skeleton(ref, "transformer"))
        plan = choose(
            ladder("diffuse", sizes, jobs[0], device=device),
            probe(budget_gib=args.cap_gib if cuda else None).budget_bytes,
        )[0]
        return plan, apply(plan, registry.load_transformer(ref))

    def denoise_once(transformer, plan, job, steps, embeds=None):
        if embeds is None:  # the night's, from its store
            embeds = store.load_tensors("encode", JobKeys.of(job, ref).embeddings)
        temporal, spatial = registry.vae_factors(ref)
        noise = stages.job_noise(
            job, transformer.config.in_channels, temporal=temporal, spatial=spatial, device=device
        )
        times = []
        last = [time.perf_counter()]

        def on_step(i, n):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        last[0] = time.perf_counter()
        latents = stages.denoise(
            transformer,
            registry.load_scheduler(ref),
            noise,
            embeds["cond"],
            embeds.get("uncond"),
            steps=steps,
            guidance=job.guidance,
            compute_dtype=ref.weight_dtype,
            shared_timestep=plan.shared_timestep,
            cfg_batch=plan.cfg_batch,
            on_step=on_step,
        )
        return latents, times

    def warm_compile() -> dict:
        """`--warm-compile`: the blocks compiled once at the night's shapes (random embeddings of the
        encoder's shape), then Dynamo reset: Inductor's on-disk cache is what an earlier night left."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(get_settings().inductor_dir)  # the night's
        cap(True)
        start = time.perf_counter()
        plan, transformer = transformer_for_night()
        transformer.compile_repeated_blocks(dynamic=False)
        width = registry.skeleton(ref, "text_encoder").config.d_model
        text = torch.randn(1, ref.rules.max_sequence_length, width, dtype=ref.weight_dtype, device=device)
        _, times = denoise_once(transformer, plan, jobs[0], 2, {"cond": text, "uncond": text})
        del transformer
        drop_everything()
        torch._dynamo.reset()
        return {"plan": plan.name, "s": time.perf_counter() - start, "step_times": times}

    # --- ours: the nightly flow, Prefect included (first, so it pays the process's warm-up) ------
    catalogue = args.work / "night.toml"
    fields = ("prompt", "negative_prompt", "seed", "height", "width", "frames", "steps")
    catalogue.write_text(
        "".join(
            f"[[template]]\nname = {json.dumps(j.template)}\n"
            + "".join(f"{k} = {json.dumps(getattr(j, k))}\n" for k in fields)
            for j in jobs
        )
    )
    os.environ["T2V_DATA_DIR"] = str(args.work / "ours")
    if cuda:
        os.environ["T2V_VRAM_BUDGET_GB"] = str(args.cap_gib)
    from flows.nightly import nightly
    from t2v import pinning
    from t2v import runner as runner_module
    from t2v.runlog import RunLog

    if args.warm_compile:
        results["phases"]["warm_compile"] = warm_compile()
        log(f"warm compile: {results['phases']['warm_compile']}")
    cap(True)
    timer = ComputeTimer(torch)
    timer.wrap(stages, "encode_texts", "encode")
    timer.wrap(stages, "denoise", "denoise")
    timer.wrap(stages, "decode_latents", "decode")
    timer.wrap(runner_module, "apply", "apply")
    timer.wrap(runner_module, "apply", lambda args: f"apply_{args[0].stage}")
    # Where the rest of the wall time goes: Prefect's task calls, the runner's stage methods (keys, store
    # checks, run-log rows), run-log commits and the store's fsyncs.
    import flows.nightly as nightly_module
    from t2v import store as store_module
    from t2v.runner import StageRunner

    for stage in ("encode", "diffuse", "decode", "watermark"):
        timer.wrap(StageRunner, stage, f"runner_{stage}", sync=False)
    # A stage's tasks run together in the flow's threads: each stage is timed as the flow waits for it.
    timer.wrap(nightly_module, "_stage", lambda args: f"stage_{args[0]}", sync=False)
    timer.wrap(
        nightly_module,
        "_collect",
        lambda args: "watermark_tail" if args[0] == "watermark" else None,
        sync=False,
    )
    timer.wrap(runner_module, "_pinned", "prefetch", sync=False)  # in the background thread
    from diffusers.models.modeling_utils import ModelMixin

    timer.wrap(ModelMixin, "compile_repeated_blocks", "compile_call", sync=False)
    timer.wrap(pinning.HostPin, "release", "unpin", sync=False)
    timer.wrap(runner_module.Residency, "drop", "drop", sync=False)
    timer.wrap(runner_module.gc, "collect", "gc_collect", sync=False)
    timer.wrap(torch.cuda, "empty_cache", "empty_cache", sync=False)
    timer.wrap(runner_module, "import_compiler", "import_compiler", sync=False)  # in a stage's wait
    pins: list[dict] = []
    real_pin = runner_module.pin_host_tensors

    def recorded_pin(module, **kwargs):
        pin = real_pin(module, **kwargs)
        host = [t for t in (*module.parameters(), *module.buffers()) if t.device.type == "cpu"]
        pins.append(
            {
                "component": type(module).__name__,
                "s": pin.seconds,
                "registered_gb": pin.registered_bytes / 1e9,
                "ranges": len(pin.registered),
                "packed_gb": pin.packed_bytes / 1e9,
                "host_tensors_pinned": sum(t.is_pinned() for t in host) / max(1, len(host)),
            }
        )
        return pin

    runner_module.pin_host_tensors = recorded_pin
    card_lock = runner_module._RESIDENCY.lock
    runner_module._RESIDENCY.lock = TimedLock(card_lock, timer)
    # Parts of `prefect_and_flow` the flow's own thread spends outside the stages.
    for owner, name in (
        (nightly_module, "prefetch"),
        (nightly_module, "clean_up_after_crashes"),
        (nightly_module, "_publish_stage_table"),
        (runner_module, "release_components"),
        (RunLog, "start_run"),
        (RunLog, "finish_run"),
    ):
        timer.wrap(owner, name, f"flow_{name}", sync=False)
    timer.wrap(RunLog, "_insert_stage", "runlog_insert", sync=False)
    timer.wrap(RunLog, "_finish_stage", "runlog_finish", sync=False)
    timer.wrap(store_module, "_fsync", "fsync", sync=False)
    pauses: list[tuple[int, float]] = []

    def on_gc(phase, info):
        if phase == "start":
            on_gc.t0 = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - on_gc.t0))

    gc.callbacks.append(on_gc)
    retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    log("ours: nightly flow")
    peak = PeakMemory(device)
    start = timer.t0 = time.perf_counter()
    with peak:
        outcome = nightly(catalogue=str(catalogue), model=model)
    ours_wall = time.perf_counter() - start
    timer.restore()
    runner_module.pin_host_tensors = real_pin
    runner_module._RESIDENCY.lock = card_lock
    gc.callbacks.remove(on_gc)
    rows = RunLog(f"sqlite:///{args.work / 'ours' / 'runlog.sqlite'}").run(outcome["run_id"])["stages"]
    results["phases"]["ours"] = {
        "wall_s": ours_wall,
        "clips": len(outcome["clips"]),
        "failed": outcome["failed"],
        "compute_s": dict(timer.seconds),
        "calls": dict(timer.calls),
        "pins": pins,
        "events": timer.events,
        "gc_pause_s": {g: sum(p for gen, p in pauses if gen == g) for g in (0, 1, 2)},
        "gc_gen2_count": sum(1 for gen, _ in pauses if gen == 2),
        "alloc_retries": (torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0) if cuda else 0,
        "peak_allocated_gib": peak.allocated_gib,
        "peak_reserved_gib": peak.reserved_gib,
        "peak_nvml_gib": peak.nvml_gib,
        "rows": [
            {
                k: r[k]
                for k in (
                    "stage",
                    "template",
                    "status",
                    "plan",
                    "wall_s",
                    "peak_reserved_gib",
                    "peak_nvml_gib",
                )
            }
            for r in rows
        ],
    }
    summarise(results)
    log(
        f"ours: {ours_wall:.1f} s for {len(outcome['clips'])} clips; compute {timer.compute_s:.1f} s "
        f"({timer.seconds}); overhead share {results['ours_overhead_share']:.3f}"
    )
    save()
    ours_latents = {}
    from t2v.runner import JobKeys
    from t2v.store import Store

    store = Store(args.work / "ours" / "store")
    for j in jobs:
        ours_latents[j.template] = store.load_tensors("diffuse", JobKeys.of(j, ref).latents)["latents"]

    # --- step cache and torch.compile on our runner, same card, same cap ------------------------
    def runner_phase(name: str, fn) -> None:
        if name in skip:
            return
        if time.perf_counter() - began > args.deadline_s:
            results["phases"][name] = {"skipped": f"past --deadline-s {args.deadline_s}"}
            save()
            return
        try:
            results["phases"][name] = fn()
        except Exception as exc:
            traceback.print_exc()
            results["phases"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"{name}: {results['phases'][name]}")
        save()

    def rel(a, b) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def step_cache_phase() -> dict:
        from t2v.runner import step_cache

        drop_everything()
        cap(True)
        plan, transformer = transformer_for_night()
        job = jobs[0]
        out = {"plan": plan.name}
        plain, plain_times = denoise_once(transformer, plan, job, args.steps)
        out["uncached_s"] = sum(plain_times)
        out["uncached_matches_night"] = rel(plain.cpu(), ours_latents[job.template])
        for threshold in (0.1, 0.3, 1.0):
            with step_cache(transformer, threshold):
                cached, times = denoise_once(transformer, plan, job, args.steps)
            out[f"threshold_{threshold}"] = {
                "s": sum(times),
                "speedup": sum(plain_times) / sum(times),
                "latents_rel_change": rel(cached.cpu(), plain.cpu()),
            }
        out["step_times_uncached"] = plain_times
        return out

    def compile_phase() -> dict:
        """After the night: what the next night's compile costs. Dynamo's in-process caches are reset;
        Inductor's on-disk cache (beside the store, as the runner sets it) keeps the night's kernels, as
        it does for the next night's flow-run process (which also pays ~imports this process has)."""
        drop_everything()
        cap(True)
        torch._dynamo.reset()
        plan, transformer = transformer_for_night()
        job = jobs[0]
        out = {"plan": plan.name, "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
        plain, plain_times = denoise_once(transformer, plan, job, 3)
        start = time.perf_counter()
        transformer.compile_repeated_blocks(fullgraph=False, dynamic=False)
        out["compile_call_s"] = time.perf_counter() - start
        _, first = denoise_once(transformer, plan, job, 3)
        compiled, again = denoise_once(transformer, plan, job, 3)
        out["latents_rel_change"] = rel(compiled.cpu(), plain.cpu())
        out["uncompiled_step_times"] = plain_times
        out["first_compiled_step_times"] = first
        out["compiled_step_times"] = again
        out["compile_overhead_s"] = sum(first) - sum(again)
        later = sorted(again[1:] or again)[len(again[1:] or again) // 2]
        base = sorted(plain_times[1:] or plain_times)[len(plain_times[1:] or plain_times) // 2]
        out["median_step_uncompiled_s"] = base
        out["median_step_compiled_s"] = later
        out["break_even_steps"] = out["compile_overhead_s"] / (base - later) if base > later else None
        return out

    runner_phase("cache", step_cache_phase)
    drop_everything()

    # --- the baseline: a per-video loop over stock WanPipeline -----------------------------------
    from diffusers import WanPipeline
    from diffusers.hooks import apply_group_offloading

    from t2v.models import fullsize

    def pipeline():
        return WanPipeline(
            tokenizer=registry.load_tokenizer(ref),
            text_encoder=fullsize.clone(masters["text_encoder"]),
            transformer=fullsize.clone(masters["transformer"]),
            vae=fullsize.clone(masters["vae"]),
            scheduler=registry.load_scheduler(ref),
            expand_timesteps=True,
        )

    def baseline(setup, label: str, jobs_run) -> dict:
        out_dir = args.work / label
        out_dir.mkdir(parents=True, exist_ok=True)
        cap(True)
        peak = PeakMemory(device)
        per_job = []
        start = time.perf_counter()
        with peak:
            pipe = pipeline()
            setup(pipe)
            setup_s = time.perf_counter() - start
            for job in jobs_run:
                t0 = time.perf_counter()
                video = pipe(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt,
                    height=job.height,
                    width=job.width,
                    num_frames=job.frames,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance,
                    generator=torch.Generator("cpu").manual_seed(job.seed),
                    output_type="np",
                ).frames[0]
                t1 = time.perf_counter()
                np.save(out_dir / f"{job.template}.npy", stages.to_uint8(video))
                per_job.append({"job": job.template, "pipe_s": t1 - t0, "save_s": time.perf_counter() - t1})
                log(f"{label} {job.template}: {t1 - t0:.1f} s")
        wall = time.perf_counter() - start
        del pipe
        drop_everything()
        return {
            "wall_s": wall,
            "setup_s": setup_s,
            "clips": len(per_job),
            "per_job": per_job,
            "peak_allocated_gib": peak.allocated_gib,
            "peak_reserved_gib": peak.reserved_gib,
            "peak_nvml_gib": peak.nvml_gib,
        }

    def model_offload(pipe) -> None:
        pipe.enable_model_cpu_offload(device=device)
        pipe.vae.enable_tiling()

    def group_offload(pipe) -> None:
        # diffusers' docs for small cards: group offloading with CUDA streams, VAE tiling.
        onload = torch.device(device)
        pipe.transformer.enable_group_offload(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
        apply_group_offloading(
            pipe.text_encoder, onload_device=onload, offload_type="leaf_level", use_stream=True
        )
        pipe.vae.to(device)
        pipe.vae.enable_tiling()

    if "baseline" in skip:  # ours alone (at more steps than both sides fit in one device command)
        runner_phase("compile", compile_phase)
        server.terminate()
        print(json.dumps({k: v for k, v in results.items() if k != "phases"}, indent=1, default=str))
        return
    if cuda and "model-offload" not in skip:
        log("baseline: enable_model_cpu_offload")
        try:
            results["phases"]["baseline_model_offload"] = baseline(model_offload, "model-offload", jobs[:1])
        except torch.OutOfMemoryError as exc:
            results["phases"]["baseline_model_offload"] = {
                "error": f"OutOfMemoryError: {str(exc)[:300]}",
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
            }
            drop_everything()
        log(f"model offload: {results['phases']['baseline_model_offload']}")
        save()
    if cuda:
        log("baseline: group offload loop")
        results["phases"]["baseline"] = base = baseline(group_offload, "group-offload", jobs)
    else:
        results["phases"]["baseline"] = base = baseline(lambda pipe: None, "plain", jobs)
    summarise(results)
    # Same seed, same weights: how far our latents are from the baseline's, through the decoded frames.
    diffs = []
    for j in jobs:
        theirs = np.load(args.work / ("group-offload" if cuda else "plain") / f"{j.template}.npy").astype(
            np.int16
        )
        frames_key = JobKeys.of(j, ref).frames
        ours_frames = np.load(store.path("decode", frames_key)) if not has_ffmpeg() else None
        if ours_frames is not None:
            diffs.append(float(np.abs(ours_frames.astype(np.int16) - theirs).mean()))
    results["frames_mean_abs_diff_vs_baseline"] = diffs
    log(f"baseline {base['wall_s']:.1f} s; ratio {results['ratio']:.2f}")
    save()

    runner_phase("compile", compile_phase)
    server.terminate()
    print(json.dumps({k: v for k, v in results.items() if k != "phases"}, indent=1, default=str))


if __name__ == "__main__":
    main()
