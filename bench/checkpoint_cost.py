"""What saving a diffusion's state costs at 720P: the latents and the scheduler's multistep history
copied off the card and written to the store (digest and fsync included), as the diffuse stage does
between steps (t2v/pipeline/diffuse.py), beside the time of one denoising step.

    python bench/checkpoint_cost.py --out bench/results       # on a GPU (the device tool)
    python bench/checkpoint_cost.py --small --out /tmp/bench  # CPU smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from t2v import checkpoints  # noqa: E402
from t2v.models import tiny  # noqa: E402
from t2v.pipeline.diffuse import CHECKPOINTS  # noqa: E402
from t2v.store import Store  # noqa: E402

SHAPES = {"1280x704x121": (1, 48, 31, 44, 80), "832x480x81": (1, 48, 21, 30, 52), "small": (1, 4, 3, 4, 6)}
STEP_S = {"1280x704x121": 2.16, "832x480x81": 0.45}
"""Seconds a denoising step takes on the H200 with all weights on the card (bench/results/
gpu_memory_registry.json, `ours`): what the save is compared with."""


def scheduler_after_steps(shape: tuple[int, ...], device: str, steps: int = 3):
    """The model's UniPC scheduler after a few steps, with its history on `device`."""
    scheduler = tiny.build_scheduler()
    scheduler.set_timesteps(50, device=device)
    scheduler.set_begin_index(0)
    latents = torch.randn(shape, device=device)
    for t in scheduler.timesteps[:steps]:
        latents = scheduler.step(torch.randn_like(latents), t, latents, return_dict=False)[0]
    return scheduler, latents


def time_saves(store: Store, shape: tuple[int, ...], device: str, repeats: int) -> dict:
    scheduler, latents = scheduler_after_steps(shape, device)
    seconds, size = [], 0
    for i in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        state = checkpoints.scheduler_state(scheduler)
        with store.writing(CHECKPOINTS, f"{i:032x}") as temp:
            checkpoints.save(temp, checkpoints.Checkpoint(3, latents, state))
        seconds.append(time.perf_counter() - start)
        size = store.path(CHECKPOINTS, f"{i:032x}").stat().st_size
    return {"save_s": statistics.median(seconds), "all_s": seconds, "bytes": size}


def sha256_gb_per_s(megabytes: int = 512) -> float:
    data = os.urandom(megabytes * 2**20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return megabytes / 1024 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--small", action="store_true", help="CPU smoke run on a tiny shape")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    records = []
    with tempfile.TemporaryDirectory(dir=args.out if args.out.exists() else None) as root:
        for name in ["small"] if args.small else ["1280x704x121", "832x480x81"]:
            timed = time_saves(Store(Path(root)), SHAPES[name], device, args.repeats)
            step = STEP_S.get(name)
            records.append(
                {"resolution": name, "device": device, **timed, "step_s": step}
                | ({"per_step_if_every_step": timed["save_s"] / step} if step else {})
                | ({"per_step_every_60_s": timed["save_s"] / (60.0 / step) / step} if step else {})
            )
    records.append({"sha256_gb_per_s": sha256_gb_per_s(64 if args.small else 512)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "checkpoint_cost.json").write_text(json.dumps(records, indent=1))
    for record in records:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
