"""A LoRA's cost per denoising step, unmerged (peft's forward) and folded (`t2v.lora_fuse`), and the
folded path's deviation (issue 18, item 5: the LoRA night's ratio).

The full-size transformer with random weights on the card, uncapped (what a step computes, not where
its weights wait), random prompt embeddings of 512 tokens, CFG 5 as one batch of 2, and one random
rank-`--rank` LoRA file of every block's attention and FFN projections (bench/few_step.py's
`make_lora`) at scale 1. For each `--sizes`: `--steps` steps from the same latents with no adapter
active, unmerged, folded; the first step is a warm-up, the median of the others is reported.
Deviation, at the first size: the latents after the steps of both bf16 paths against the same
transformer upcast to fp32 (its bf16 weights, exactly), unmerged.

    python bench/lora_fold.py --out bench/results          # on a GPU: bench/results/lora_fold.json
    python bench/lora_fold.py --tiny --out /tmp/lorafold    # CPU smoke run, built-in model
    python bench/lora_fold.py --compile --cases none,folded,none --steps 6 --sizes 832x480x81 \
        --out /tmp/lf && cp /tmp/lf/lora_fold.json bench/results/lora_fold_compiled.json

`--compile`: the blocks compiled as the runner compiles them (`placement.compile_blocks`), each case's
first step paying its compile; no fp32 reference, and dynamo's graph and graph-break counts per case
(`compiled_graphs`, `graph_breaks`) in the records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from bench.attention import _record, _steps  # noqa: E402
from bench.few_step import make_lora  # noqa: E402
from t2v import lora, placement, stages  # noqa: E402
from t2v.models import fullsize, registry, tiny  # noqa: E402

SIZES = "832x480x81,1280x704x121"
CASES = ("none", "unmerged", "folded")


def _activate(transformer: torch.nn.Module, case: str, item: lora.Lora, device: str) -> None:
    lora.activate(transformer, () if case == "none" else (item,), device=device, fold=case == "folded")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/t2v-lora-fold"))
    parser.add_argument("--tiny", action="store_true", help="the built-in model on the CPU: a smoke run")
    parser.add_argument("--sizes", help=f"WxHxF list (default {SIZES}; tiny 96x64x9)")
    parser.add_argument("--steps", type=int, default=3, help="per measurement, the first a warm-up")
    parser.add_argument("--rank", type=int, help="of the random LoRA file (default 64; tiny 4)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {','.join(CASES)}")
    parser.add_argument("--compile", action="store_true", help="the blocks compiled, as the runner does")
    args = parser.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    ref = registry.resolve_model(registry.BUILTIN if args.tiny else registry.RANDOM_FULL_SIZE)
    path = make_lora(ref, args.work / "style", rank=args.rank or (4 if args.tiny else 64), seed=1)
    item = lora.Lora(str(path), 1.0)
    adapter = lora.Adapter.of(item)
    if args.tiny:
        transformer = tiny.build_transformer()
    else:
        transformer = fullsize.build("transformer", device=device, keep_on=device)
    # The same weights computed in fp32: the deviation's reference (none when compiled).
    exact = None if args.compile else fullsize.clone(transformer).float()
    for module in (transformer, exact):
        if module is not None:
            lora.load(module, [adapter])
    if args.compile:
        placement.compile_blocks(transformer)
    scheduler = registry.load_scheduler(registry.resolve_model(registry.BUILTIN))
    gen = torch.Generator().manual_seed(0)
    text = (1, 512, transformer.config.text_dim)
    cond, uncond = (torch.randn(*text, generator=gen).to(device) for _ in range(2))
    results: dict = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "records": []}
    results |= {"torch": torch.__version__, "rank": args.rank or (4 if args.tiny else 64)}
    sizes = (args.sizes or ("96x64x9" if args.tiny else SIZES)).split(",")
    for n, size in enumerate(sizes):
        width, height, frames = (int(v) for v in size.split("x"))
        shape = stages.latent_shape(
            transformer.config.in_channels, temporal=4, spatial=16, height=height, width=width, frames=frames
        )
        latents = stages.initial_noise(shape, seed=0, device=device)
        bf16 = [t.to(transformer.dtype) for t in (cond, uncond)]
        reference = None
        if n == 0 and exact is not None:
            _activate(exact, "unmerged", item, device)
            reference, _ = _steps(exact, scheduler, latents.float(), cond, uncond, args.steps)
            del exact
            if device == "cuda":
                torch.cuda.empty_cache()
        base = None
        for case in args.cases.split(","):
            _activate(transformer, case, item, device)
            counters.clear()
            out, times = _steps(transformer, scheduler, latents, *bf16, args.steps)
            record = _record(size, case, times, out, None)
            record["case"] = record.pop("backend")
            if args.compile:
                record["compiled_graphs"] = counters["stats"]["unique_graphs"]
                record["graph_breaks"] = dict(counters["graph_break"])
            if base is None:
                base = record["step_s"]
            record["vs_none"] = record["step_s"] / base
            if reference is not None:
                record["latents_rel_l2_vs_fp32_unmerged"] = float((out - reference).norm() / reference.norm())
            results["records"].append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "step_times_s"}), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "lora_fold.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
