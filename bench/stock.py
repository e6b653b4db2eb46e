"""The baseline of bench/nightly_throughput.py: stock diffusers `WanPipeline`, called once per video.

First as the issue words it, `enable_model_cpu_offload()` + `vae.enable_tiling()`; where that cannot fit
the cap (the 10 GB transformer and 11 GB text encoder move whole), the loop diffusers' docs give for
small cards: group offloading with CUDA streams (transformer by blocks, text encoder by leaves) and VAE
tiling. On a CPU, the plain pipeline. Frames are saved per clip with `np.save`. The pipelines are built
from clones of the weights our night loaded (`Session.masters`).
"""

from __future__ import annotations

import time

import numpy as np

from bench.night import log
from bench.session import GiB, Session


def build_masters(s: Session) -> None:
    """Each component built once, before anything is timed (`results.build_s`)."""
    from t2v.models.registry import COMPONENTS, load_component

    start = time.perf_counter()
    s.masters = {name: load_component(s.ref, name) for name in COMPONENTS}
    s.results["build_s"] = time.perf_counter() - start
    log(f"weights built in {s.results['build_s']:.1f} s")


def pipeline(s: Session):
    from diffusers import WanPipeline

    from t2v.models import fullsize, registry

    return WanPipeline(
        tokenizer=registry.load_tokenizer(s.ref),
        scheduler=registry.load_scheduler(s.ref),
        expand_timesteps=True,
        **{name: fullsize.clone(master) for name, master in s.masters.items()},
    )


def make_clip(s: Session, pipe, job) -> np.ndarray:
    from t2v import stages

    video = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        height=job.height,
        width=job.width,
        num_frames=job.frames,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        generator=s.torch.Generator("cpu").manual_seed(job.seed),
        output_type="np",
    ).frames[0]
    return stages.to_uint8(video)


def baseline(s: Session, setup, name: str, jobs) -> dict:
    """`jobs` one after the other through one pipeline set up by `setup(pipe, device)`: its record."""
    from t2v.vram import PeakMemory

    out_dir = s.args.work / name
    out_dir.mkdir(parents=True, exist_ok=True)
    s.cap(True)
    peak = PeakMemory(s.device)
    per_job = []
    start = time.perf_counter()
    with peak:
        pipe = pipeline(s)
        setup(pipe, s.device)
        setup_s = time.perf_counter() - start
        for job in jobs:
            t0 = time.perf_counter()
            frames = make_clip(s, pipe, job)
            t1 = time.perf_counter()
            np.save(out_dir / f"{job.template}.npy", frames)
            per_job.append({"job": job.template, "pipe_s": t1 - t0, "save_s": time.perf_counter() - t1})
            log(f"{name} {job.template}: {t1 - t0:.1f} s")
    wall = time.perf_counter() - start
    del pipe
    s.free()
    return {
        "wall_s": wall,
        "setup_s": setup_s,
        "clips": len(per_job),
        "per_job": per_job,
        "peak_allocated_gib": peak.allocated_gib,
        "peak_reserved_gib": peak.reserved_gib,
        "peak_nvml_gib": peak.nvml_gib,
    }


def no_setup(pipe, device: str) -> None:
    """On a CPU: the pipeline as it is built."""


def model_offload(pipe, device: str) -> None:
    pipe.enable_model_cpu_offload(device=device)
    pipe.vae.enable_tiling()


def group_offload(pipe, device: str) -> None:
    """diffusers' docs for small cards: group offloading with CUDA streams, VAE tiling."""
    import torch
    from diffusers.hooks import apply_group_offloading

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


def model_offload_phase(s: Session) -> None:
    """The issue's baseline on one job; out of memory under the cap is its record."""
    torch = s.torch
    log("baseline: enable_model_cpu_offload")
    phases = s.results["phases"]
    try:
        phases["baseline_model_offload"] = baseline(s, model_offload, "model-offload", s.jobs[:1])
    except torch.OutOfMemoryError as exc:
        phases["baseline_model_offload"] = {
            "error": f"OutOfMemoryError: {str(exc)[:300]}",
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }
        s.free()
    log(f"model offload: {phases['baseline_model_offload']}")
    s.save()


def frame_diffs(s: Session, name: str) -> list[float]:
    """Same seed, same weights: mean |our frames - the baseline's| per job (0-255 units)."""
    from bench.ours import night_frames

    diffs = []
    for job in s.jobs:
        theirs = np.load(s.args.work / name / f"{job.template}.npy").astype(np.int16)
        ours = night_frames(s, job).astype(np.int16)
        diffs.append(float(np.abs(ours - theirs).mean()))
    return diffs


def baseline_phases(s: Session) -> None:
    """The baselines, then the headline figures with them."""
    from bench.summary import summarise

    if s.cuda and "model-offload" not in s.skip:
        model_offload_phase(s)
    name = "group-offload" if s.cuda else "plain"
    log(f"baseline: {name} loop")
    s.results["phases"]["baseline"] = base = baseline(s, group_offload if s.cuda else no_setup, name, s.jobs)
    summarise(s.results)
    s.results["frames_mean_abs_diff_vs_baseline"] = frame_diffs(s, name)
    log(f"baseline {base['wall_s']:.1f} s; ratio {s.results['ratio']:.2f}")
    s.save()
