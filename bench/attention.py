"""Attention kernels and compiled blocks, per denoising step of Wan2.2 TI2V-5B (issue 19, items 1-2).

The full-size transformer with random weights on the card, uncapped (a cap changes where the weights
wait, not which kernel runs), random prompt embeddings of 512 tokens, CFG 5 as one batch of 2. For each
`--sizes` and each backend of `t2v.attention` (set as the diffuse stage sets it), `--steps` steps from
the same latents: the first is a warm-up (kernel planning, sage's Triton build), the later ones timed
with the card synchronised. Deviation: relative L2 and max abs of the latents after the steps against
`sdpa` (PyTorch's own pick). The product's `auto` choice for each size is printed with its probe (the
log line "attention on ..."). Then `compile`: the blocks compiled (`compile_repeated_blocks`, as the
runner does) on `auto`'s backend; its first step's excess over the median is the compile's cost.

    python bench/attention.py --out bench/results       # on a GPU: bench/results/attention.json
    python bench/attention.py --tiny --out /tmp/attn     # CPU smoke run: sdpa only, no compile
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import torch  # noqa: E402

from t2v import attention, stages  # noqa: E402
from t2v.jobs import JobSpec  # noqa: E402
from t2v.models import fullsize, registry, tiny  # noqa: E402
from t2v.pipeline.diffuse import diffusion_tokens  # noqa: E402

SIZES = "1280x704x121,832x480x81"
BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "sage")


def _steps(transformer, scheduler, latents, cond, uncond, steps: int) -> tuple[torch.Tensor, list[float]]:
    """`steps` denoising steps and each one's seconds, the card synchronised around each."""
    times: list[float] = []
    last = [0.0]

    def on_step(i: int, n: int) -> None:
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if latents.device.type == "cuda":
        torch.cuda.synchronize()
    last[0] = time.perf_counter()
    out = stages.denoise(
        transformer,
        copy.deepcopy(scheduler),
        latents,
        cond,
        uncond,
        steps=steps,
        guidance=5.0,
        compute_dtype=transformer.dtype,
        shared_timestep=True,
        cfg_batch=2,
        on_step=on_step,
    )
    return out.float(), times


def _record(size: str, backend: str, times: list[float], out: torch.Tensor, reference) -> dict:
    later = times[1:] or times
    record = dict(size=size, backend=backend, step_s=statistics.median(later), step_times_s=times)
    record["first_step_excess_s"] = times[0] - record["step_s"]
    if reference is not None:
        record["latents_rel_l2_vs_sdpa"] = float((out - reference).norm() / reference.norm())
        record["latents_max_abs_vs_sdpa"] = float((out - reference).abs().max())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="the built-in model on the CPU: a smoke run")
    parser.add_argument("--sizes", help=f"WxHxF list (default {SIZES}; tiny 96x64x9)")
    parser.add_argument("--steps", type=int, default=3, help="per measurement, the first a warm-up")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = "cpu" if args.tiny else "cuda"
    backends = ["sdpa"] if args.tiny else args.backends.split(",")
    if args.tiny:
        transformer = tiny.build_transformer()
    else:
        transformer = fullsize.build("transformer", device=device, keep_on=device)
    scheduler = registry.load_scheduler(registry.resolve_model(registry.BUILTIN))
    gen = torch.Generator().manual_seed(0)
    text = (1, 512, transformer.config.text_dim)
    cond, uncond = (torch.randn(*text, generator=gen).to(device, transformer.dtype) for _ in range(2))
    records: list[dict] = []
    sizes = (args.sizes or ("96x64x9" if args.tiny else SIZES)).split(",")

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention.json").write_text(json.dumps(records, indent=1))

    latents, references, shapes = {}, {}, {}
    for size in sizes:
        width, height, frames = (int(v) for v in size.split("x"))
        job = JobSpec(template="bench", prompt="p", height=height, width=width, frames=frames)
        channels = transformer.config.in_channels
        shape = stages.latent_shape(
            channels, temporal=4, spatial=16, height=height, width=width, frames=frames
        )
        latents[size] = stages.initial_noise(shape, seed=0, device=device)
        shapes[size] = attention.Shape.of(transformer, diffusion_tokens(job), transformer.dtype)
        for backend in backends:
            try:
                attention.apply(transformer, backend)
                out, times = _steps(transformer, scheduler, latents[size], cond, uncond, args.steps)
            except Exception as exc:  # one kernel that cannot run must not lose the others
                records.append(dict(size=size, backend=backend, error=f"{type(exc).__name__}: {exc}"[:300]))
                print(json.dumps(records[-1]), flush=True)
                continue
            if backend == "sdpa":
                references[size] = out
            records.append(
                _record(size, backend, times, out, None if backend == "sdpa" else references.get(size))
            )
            print(json.dumps({k: v for k, v in records[-1].items() if k != "step_times_s"}), flush=True)
            save()
        chosen = attention.resolve("auto", shapes[size], device)
        records.append(dict(size=size, backend="auto", chose=chosen, shape=str(shapes[size])))
        print(json.dumps(records[-1]), flush=True)
        save()
    if args.tiny or args.no_compile:
        return
    transformer.compile_repeated_blocks(dynamic=False)
    for size in sizes:
        attention.apply(transformer, attention.resolve("auto", shapes[size], device))
        out, times = _steps(transformer, scheduler, latents[size], cond, uncond, args.steps)
        record = _record(size, f"compile+{attention.current(transformer)}", times, out, references.get(size))
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "step_times_s"}), flush=True)
        save()


if __name__ == "__main__":
    main()
