"""GPU memory and speed of Wan2.2 TI2V-5B: stock diffusers beside t2v's plans, one process, one card.

Builds the full-size architecture from its public config with random weights (t2v.models.fullsize),
then for each resolution runs, from the same master weights and the same seed:
  stock-gpu            WanPipeline, everything on the card (`pipe.to("cuda")`)
  stock-model-offload  WanPipeline with `enable_model_cpu_offload()`
  stock-group-offload  group offloading as diffusers' docs show it (leaf level + CUDA streams for the
                       transformer and text encoder, VAE on the card with `enable_tiling()`)
  ours                 t2v's planner with the card's free memory as budget
  ours-cap8 / -cap6    t2v's planner under an 8 / 6 GiB cap (`set_per_process_memory_fraction`)
A case of ours takes switches after `+` (issue 19, item 5: each switch's effect in one run):
  +compile             the placed transformer's blocks compiled (`compile_repeated_blocks`, as the
                       runner does on a GPU): the first step's excess over the others is the compile
  +attn=KERNEL         the diffusion's attention kernel (t2v/attention.py: sdpa, cudnn, flash, ...)
  +fp8                 fp8 weight storage (lossy, opt-in; also any case naming fp8, as before)
Each case: encode (prompt + negative, 512 tokens), `--steps` denoising steps with CFG 5.0, VAE decode.
The 50-step total is extrapolated: encode + first step + 49 x median of the later steps + decode.

    python bench/gpu_memory.py --out bench/results            # on a GPU (the device tool)
    python bench/gpu_memory.py --out bench/results --cases \
        stock-gpu,ours,ours+compile,ours-cap6,ours-cap6+compile,ours-cap6+attn=flash,ours-cap6+fp8
    python bench/gpu_memory.py --tiny --out /tmp/bench        # CPU smoke run of the same code paths
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# t2v first: its PYTORCH_CUDA_ALLOC_CONF (expandable segments, pinning through cudaHostRegister) is
# set before torch touches the card, so that this measures what the product runs with.
import t2v  # noqa: E402, F401

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.clock import Clock, GiB, free_cuda, rel, step_timer, total_50  # noqa: E402
from bench.gpu_stock import NEGATIVE, PROMPT, run_stock  # noqa: E402
from t2v import attention, stages  # noqa: E402
from t2v.engine.runner import import_compiler  # noqa: E402
from t2v.jobs import JobSpec  # noqa: E402
from t2v.models import fullsize, tiny  # noqa: E402
from t2v.pipeline import decode, diffuse, encode  # noqa: E402
from t2v.placement import apply, compile_blocks  # noqa: E402
from t2v.plans import ComponentSizes, choose  # noqa: E402

RESOLUTIONS = {"1280x704x121": (704, 1280, 121), "832x480x81": (480, 832, 81), "96x64x9": (64, 96, 9)}


# --- ours: the planner, then the same stage functions the runner calls --------------------------


@dataclass(frozen=True)
class Switches:
    """What a case's `+` parts switch on for the diffusion (see the module's docstring)."""

    compile: bool = False
    attention: str | None = None
    fp8: bool = False

    @classmethod
    def of(cls, case: str) -> Switches:
        base, *parts = case.split("+")
        found: dict[str, object] = {"fp8": "fp8" in base}
        for part in parts:
            name, _, value = part.partition("=")
            if name == "compile" and not value:
                found["compile"] = True
            elif name == "fp8" and not value:
                found["fp8"] = True
            elif name == "attn" and value in attention.BACKENDS:
                found["attention"] = value
            else:
                raise SystemExit(f"case {case!r}: unknown switch {part!r} (compile, attn=KERNEL, fp8)")
        if parts and base.startswith("stock"):
            raise SystemExit(f"case {case!r}: switches are for ours, not stock diffusers")
        return cls(**found)

    def set_on(self, transformer: torch.nn.Module) -> None:
        """As the diffuse stage sets them on its placed transformer, before the first step."""
        if self.attention is not None:
            attention.apply(transformer, self.attention)
        if self.compile:
            # The runner imports the compiler while it waits for a prefetched component (2.6-3.3 s
            # on the H200 host): not a cost of the first step's, so not timed in it here either.
            import_compiler()
            compile_blocks(transformer)


def run_on_plans(stage, body, masters, sizes, job, device, budget, record_stream, fp8, plans_used, attempts):
    """`body(plan, module)` on the stage's plans in order until one does not run out of memory, as the
    runner's attempts do; the plan taken goes to `plans_used`, each out-of-memory to `attempts`."""
    component = stage.component
    for plan in choose(stage.ladder(sizes[component], job, device=device, fp8=fp8), budget):
        plan = replace(plan, record_stream=record_stream)
        module = None
        try:
            module = apply(plan, fullsize.clone(masters[component]))
            out = body(plan, module)
            plans_used[stage.name] = plan.name
            return out
        except torch.OutOfMemoryError as exc:
            attempts.append(f"{plan.name}: OOM ({str(exc).splitlines()[0][:80]})")
        finally:
            del module
            free_cuda()
    raise RuntimeError(f"{stage.name}: no plan fits")


def run_ours(
    case: str,
    masters: dict,
    sizes: dict,
    tokenizer,
    job: JobSpec,
    device: str,
    steps: int,
    budget: int,
    *,
    record_stream: bool = False,
    switches: Switches = Switches(),
) -> dict:
    fp8 = switches.fp8
    clock = Clock(device)
    plans_used: dict[str, str] = {}
    attempts: list[str] = []
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()

    def with_plans(stage, body):
        return run_on_plans(
            stage, body, masters, sizes, job, device, budget, record_stream, fp8, plans_used, attempts
        )

    def encode_prompts():
        return with_plans(
            encode.STAGE,
            lambda plan, te: stages.encode_texts(
                te, tokenizer, [PROMPT, NEGATIVE], device=device, max_sequence_length=512
            ),
        )

    embeds, encode_s = clock.phase(encode.STAGE.name, encode_prompts)
    times: list[float] = []
    on_step, last = step_timer(clock, times)

    def denoise():
        def body(plan, tr):
            switches.set_on(tr)
            noise = stages.job_noise(job, tr.config.in_channels, temporal=4, spatial=16, device=device)
            times.clear()
            last[0] = time.perf_counter()
            return stages.denoise(
                tr,
                tiny.build_scheduler(),
                noise,
                embeds[:1],
                embeds[1:],
                steps=steps,
                guidance=job.guidance,
                compute_dtype=tr.dtype if device != "cpu" else torch.float32,
                shared_timestep=plan.options.shared_timestep,
                cfg_batch=plan.options.cfg_batch,
                on_step=on_step,
            )

        return with_plans(diffuse.STAGE, body)

    latents, _ = clock.phase("denoise", denoise)
    frames, decode_s = clock.phase(
        decode.STAGE.name,
        lambda: with_plans(
            decode.STAGE, lambda plan, vae: stages.decode_latents(vae, latents, device=device)
        ),
    )
    return (
        dict(
            encode_s=encode_s,
            step_times=times,
            decode_s=decode_s,
            peaks=clock.phase_peaks,
            plans=plans_used,
            oom_attempts=attempts,
        ),
        latents.float().cpu(),
        frames,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with the built-in tiny model")
    parser.add_argument("--resolutions", default="832x480x81,1280x704x121")
    parser.add_argument(
        "--cases", default="stock-gpu,stock-model-offload,stock-group-offload,ours,ours-cap8,ours-cap6"
    )
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args(argv)


def build_masters(small: bool) -> dict:
    """The three components, built once; each case clones them (sharing their tensors)."""
    if small:
        return {
            "text_encoder": tiny.build_text_encoder(),
            "transformer": tiny.build_transformer(),
            "vae": tiny.build_vae(),
        }
    return {
        c: fullsize.build(c, dtype=torch.float32 if c == "vae" else torch.bfloat16)
        for c in ("text_encoder", "transformer", "vae")
    }


def bench_job(res: str, steps: int) -> JobSpec:
    height, width, frames = RESOLUTIONS[res]
    return JobSpec(
        template="bench",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=42,
        height=height,
        width=width,
        frames=frames,
        steps=steps,
        guidance=5.0,
    )


def run_case(case: str, setup: dict, job: JobSpec, steps: int) -> tuple[dict, torch.Tensor, np.ndarray]:
    """One case under its cap (`-cap8`, `-cap6`: a card of that size)."""
    device, total_mem = setup["device"], setup["total_mem"]
    cap = case_cap(case)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction((cap * GiB / total_mem) if cap else 1.0)
        free_cuda()
    if case.startswith("stock"):
        return run_stock(case, setup["masters"], setup["tokenizer"], job, device, steps)
    budget = cap * GiB if cap else (torch.cuda.mem_get_info()[0] if device == "cuda" else 0)
    return run_ours(
        case,
        setup["masters"],
        setup["sizes"],
        setup["tokenizer"],
        job,
        device,
        steps,
        budget,
        record_stream=case.split("+")[0].endswith("-rs"),
        switches=Switches.of(case),
    )


def case_cap(case: str) -> int | None:
    base = case.split("+")[0]
    return {"8": 8, "6": 6}.get(base.split("cap")[-1][:1]) if "cap" in base else None


def make_record(case: str, res: str, result: dict, steps: int, gpu: str) -> dict:
    peaks = result["peaks"]
    later = result["step_times"][1:] or result["step_times"]  # a compiled case's first step compiles
    return dict(
        config=case,
        resolution=res,
        cap_gib=case_cap(case),
        peak_allocated_gib=max((v for k, v in peaks.items() if not k.endswith("_reserved")), default=None),
        peak_reserved_gib=max((v for k, v in peaks.items() if k.endswith("_reserved")), default=None),
        encode_s=result["encode_s"],
        step_s=statistics.median(later),
        decode_s=result["decode_s"],
        total_50_steps_s=total_50(result["encode_s"], result["step_times"], result["decode_s"]),
        total_note=f"extrapolated from {steps} measured steps",
        gpu=gpu,
        phase_peaks_gib=peaks,
        step_times_s=result["step_times"],
        plans=result["plans"],
        oom_attempts=result.get("oom_attempts"),
        setup_s=result.get("setup_s"),
        first_step_excess_s=result["step_times"][0] - statistics.median(later),
    )


def compare(record: dict, reference, latents: torch.Tensor, video: np.ndarray) -> None:
    """Deviation from stock diffusers on the same inputs and seed (the first case, stock-gpu)."""
    record["latents_rel_diff_vs_stock_gpu"] = rel(latents, reference[0])
    record["frames_mean_abs_diff_vs_stock_gpu"] = float(
        np.abs(video.astype(np.int16) - reference[1].astype(np.int16)).mean()
    )


SHOWN = ("config", "resolution", "peak_allocated_gib", "peak_reserved_gib", "encode_s", "step_s")


def run_resolution(res: str, args: argparse.Namespace, setup: dict, records: list) -> None:
    job, reference = bench_job(res, args.steps), None
    for case in args.cases.split(","):
        print(f"--- {res} {case}", flush=True)
        try:
            result, latents, video = run_case(case, setup, job, args.steps)
        except Exception as exc:  # one failed case must not lose the others' numbers
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
            records.append(
                dict(config=case, resolution=res, cap_gib=case_cap(case), error=error, gpu=setup["gpu"])
            )
            (args.out / "gpu_memory.json").write_text(json.dumps(records, indent=1))
            free_cuda()
            continue
        record = make_record(case, res, result, args.steps, setup["gpu"])
        if reference is None and case == "stock-gpu":
            reference = (latents, video)
        elif reference is not None:
            compare(record, reference, latents, video)
        records.append(record)
        (args.out / "gpu_memory.json").write_text(json.dumps(records, indent=1))
        shown = SHOWN + ("decode_s", "total_50_steps_s", "plans")
        print(json.dumps({k: record[k] for k in shown}), flush=True)
        del latents, video
        free_cuda()


def print_table(records: list) -> None:
    print(
        f"\n{'resolution':<14}{'config':<22}{'alloc GiB':>10}{'resv GiB':>10}{'enc s':>8}{'s/step':>8}"
        f"{'dec s':>8}{'50-step s':>10}  plans"
    )
    for r in records:
        if "error" in r:
            print(f"{r['resolution']:<14}{r['config']:<22}  ERROR {r['error'][:80]}")
            continue
        print(
            f"{r['resolution']:<14}{r['config']:<22}{r['peak_allocated_gib'] or 0:>10.2f}"
            f"{r['peak_reserved_gib'] or 0:>10.2f}{r['encode_s']:>8.2f}{r['step_s']:>8.2f}"
            f"{r['decode_s']:>8.1f}"
            f"{r['total_50_steps_s']:>10.1f}  {r['plans'] or ''}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for case in args.cases.split(","):
        Switches.of(case)  # a bad case before the weights are built
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    t0 = time.perf_counter()
    masters = build_masters(args.tiny)
    print(
        f"built masters in {time.perf_counter() - t0:.1f} s on {gpu}; torch {torch.__version__}; "
        f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}",
        flush=True,
    )
    setup = dict(
        device=device,
        gpu=gpu,
        total_mem=torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0,
        masters=masters,
        # byte-level ids: the encoder's compute does not depend on them
        tokenizer=tiny.build_tokenizer(),
        sizes={c: ComponentSizes.from_modules(**{c: m}) for c, m in masters.items()},
    )
    records: list = []
    for res in args.resolutions.split(","):
        run_resolution(res, args, setup, records)
    print_table(records)


if __name__ == "__main__":
    main()
