"""One run of bench/nightly_throughput.py: its options, card, model, night and results, which each of its
phases (bench/ours.py, bench/stock.py, bench/probes.py) is handed."""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from bench.night import NEGATIVE, gpu_machine_hooks, has_ffmpeg, night_templates

GiB = 2**30


@dataclass
class Session:
    args: argparse.Namespace
    skip: set[str]
    torch: Any
    cuda: bool
    model: str
    ref: Any
    """The model's `t2v.models.registry.ModelRef`."""
    jobs: list
    results: dict
    hooks: Any
    """What this machine's runs need (`t2v.engine.Hooks`): the .npy codec where there is no ffmpeg."""
    began: float = field(default_factory=time.perf_counter)
    masters: dict = field(default_factory=dict)
    """Each component as built once; the baseline's pipelines clone them."""

    @property
    def device(self) -> str:
        return "cuda:0" if self.cuda else "cpu"

    def save(self) -> None:
        path = self.args.out / "nightly_throughput.json"
        path.write_text(json.dumps(self.results, indent=1, default=str))

    def cap(self, on: bool) -> None:
        """The cap on (or off) for the next phase, its peaks counted from now."""
        if self.cuda:
            torch = self.torch
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(self.args.cap_gib * GiB / total if on else 1.0)
            torch.cuda.reset_peak_memory_stats()

    def free(self) -> None:
        """Between phases: what the last one dropped is collected, the CUDA and page-locked caches are
        emptied, so that no side inherits the other's blocks (our night's runner released its
        components at the end of its GPU stages)."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch._C._host_emptyCache()

    @cached_property
    def store(self):
        from t2v.store import Store

        return Store(self.args.work / "ours" / "store")

    def keys(self, job):
        """The job's store keys in our night (`t2v.pipeline.JobKeys`)."""
        from t2v.pipeline import JobKeys, KeyInputs, stages

        return JobKeys.of(stages(), KeyInputs(job, self.ref, fp8=False))

    def past_deadline(self) -> bool:
        return time.perf_counter() - self.began > self.args.deadline_s


def open_session(args: argparse.Namespace) -> Session:
    """Imports torch and t2v (after the Prefect server's variables are set), the night's jobs and the
    results' header."""
    import torch

    import t2v  # noqa: F401  (its allocator settings, before CUDA starts)
    from t2v.engine import Hooks
    from t2v.models.registry import RANDOM_FULL_SIZE, resolve_model

    cuda = torch.cuda.is_available() and not args.tiny
    model = "tiny" if args.tiny else RANDOM_FULL_SIZE
    height, width, frames = (64, 96, 9) if args.tiny else (480, 832, 81)
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
    hooks = Hooks()
    if not has_ffmpeg():
        hooks = gpu_machine_hooks()
        results["note"] = "no ffmpeg on this machine: frames saved as .npy on both sides, no H.264"
    return Session(
        args=args,
        skip={s for s in args.skip.split(",") if s},
        torch=torch,
        cuda=cuda,
        model=model,
        ref=resolve_model(model),
        jobs=night_jobs(args.jobs, height=height, width=width, frames=frames, steps=args.steps),
        results=results,
        hooks=hooks,
    )


def night_jobs(count: int, *, height: int, width: int, frames: int, steps: int) -> list:
    from t2v.jobs import JobSpec

    return [
        JobSpec(
            template=name,
            prompt=prompt,
            negative_prompt=NEGATIVE,
            seed=seed,
            height=height,
            width=width,
            frames=frames,
            steps=steps,
        )
        for name, prompt, seed in night_templates(count, takes=False)
    ]
