"""Timing and memory helpers of the GPU benchmarks: a synchronised clock with per-phase peaks."""

from __future__ import annotations

import gc
import statistics
import time

import torch

GiB = 2**30


class Clock:
    """Wall time of a region with the device synchronised at both ends; peak memory per phase."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.phase_peaks: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def phase(self, name: str, fn):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        self.sync()
        elapsed = time.perf_counter() - start
        if self.cuda:
            self.phase_peaks[name] = torch.cuda.max_memory_allocated() / GiB
            self.phase_peaks[name + "_reserved"] = torch.cuda.max_memory_reserved() / GiB
        return out, elapsed


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def step_timer(clock: Clock, times: list[float]):
    last = [time.perf_counter()]

    def on_step(*_args):
        clock.sync()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    return on_step, last


WARMING = 1.5
"""A step slower than this many times the fastest one still holds start-up work (a compile)."""


def warm_up_steps(steps: list[float]) -> int:
    """How many leading steps hold start-up work: the first always (first calls, a compile), and each
    next one while it is over `WARMING` x the fastest. Blocks compiled after the first forward (under
    group offloading, `placement.compile_blocks`) compile in the second step, or in the first step's
    second pass with CFG as two batches."""
    fastest, count = min(steps), 1
    while count < len(steps) - 1 and steps[count] > WARMING * fastest:
        count += 1
    return count


def total_50(encode_s: float, steps: list[float], decode_s: float) -> float:
    """A 50-step clip from the measured steps: encode, the warm-up steps as measured, the others at the
    median of the steady ones, decode."""
    warm = warm_up_steps(steps) if len(steps) > 1 else 0
    steady = steps[warm:] or steps
    return encode_s + sum(steps[:warm]) + (50 - warm) * statistics.median(steady) + decode_s


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
