"""The VAE decode alone, full-size random weights: dtypes, tile shapes and cuDNN's settings, under a card
cap, against whole frames in fp32 (the pipeline's own decode) on the same latents.

    python bench/decoder_speed.py --out bench/results          # on a GPU (the device tool)

A variant is `dtype:tiles:flags`. Tiles: `whole` for no tiling, `HxW` for tiles every 3/4 of their
side (diffusers' own grid), `HxW/SHxSW` for tiles of HxW every SH and SW pixels (t2v's even grids,
`t2v.pipeline.decode.tilings`; a tile as tall as the frame makes column strips). Flags: `bench`
(cudnn.benchmark), `cl` (channels-last convolution weights), `compile` (`torch.compile` of the whole
decoder module), `host` (tiles blended on the host: `DecodeOptions.tiles_to_host`), `cap6`/`cap8`
(card cap); several flags join with `+` (`host+cap6`). Each runs `--repeats`
times on the same latents; the last run's time is reported (the first pays cuDNN's search where
`bench` is on). Deviation: mean and max of |frame - fp32 whole frame| in 1/255 units.
Records go to `decoder_speed.json`: {resolution, variant, cap_gib, decode_s, first_s, peak_reserved_gib,
mean_abs_255, max_abs_255, gpu}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import torch  # noqa: E402

from bench.clock import GiB, free_cuda  # noqa: E402

LATENTS = {"1280x704x121": (31, 44, 80), "832x480x81": (21, 30, 52)}
VARIANTS = {
    # The plans before and after the even grids, under the caps they are chosen at (tests/test_plans.py),
    # on cuDNN's heuristics as the decode stage runs, and bf16 whole frames for what tiling costs.
    "1280x704x121": [
        "float32:whole:",
        "bfloat16:whole:",
        "bfloat16:512x512:cap8",
        "bfloat16:704x432/704x320:cap8",
        "bfloat16:256x256:cap6",
        "bfloat16:320x192/240x144:cap6",
        "bfloat16:320x256/240x192:cap6",
    ],
    "832x480x81": [
        "float32:whole:",
        "bfloat16:whole:",
        "bfloat16:512x512:cap6",
        "bfloat16:480x544/480x416:cap6",
    ],
}


def parse_tiles(text: str):
    """A variant's tiles as `t2v.pipeline.decode.Tiles`: `whole` (None), `HxW` (diffusers' own grid:
    every 3/4 of the side) or `HxW/SHxSW`."""
    from t2v.pipeline.decode import Tiles

    if text == "whole":
        return None
    side, _, stride = text.partition("/")
    height, width = (int(x) for x in side.split("x"))
    stride_h, stride_w = (int(x) for x in stride.split("x")) if stride else (height * 3 // 4, width * 3 // 4)
    return Tiles(height, width, stride_h, stride_w)


def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    from t2v.pipeline.decode import decode_frames

    return torch.from_numpy(decode_frames(vae, latents, device="cuda"))


def run_variant(
    masters: dict, res: str, variant: str, latents: torch.Tensor, reference, repeats: int = 2
) -> dict:
    from t2v.pipeline.decode import DecodeOptions, channels_last

    dtype_name, tile, flag_text = variant.split(":")
    flags = set(filter(None, flag_text.split("+")))
    cap = 6 if "cap6" in flags else 8 if "cap8" in flags else None
    free_cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap * GiB / total if cap else 1.0)
    record = {"resolution": res, "variant": variant, "cap_gib": cap, "gpu": torch.cuda.get_device_name()}
    try:
        vae = masters[dtype_name]
        vae.encoder = None
        if "cl" in flags:
            channels_last(vae)  # as the decode stage's bf16 plans prepare it

        # the decode stage's own tiling call
        DecodeOptions(vae_tiles=parse_tiles(tile), tiles_to_host="host" in flags).configure(vae)
        vae.to("cuda")
        if "compile" in flags:
            vae.decoder.compile(dynamic=False)
        times = []
        cudnn = torch.backends.cudnn.flags(enabled=True, benchmark="bench" in flags, deterministic=False)
        # A compiled decoder: room for a graph per causal-cache state (first frame, later ones) and tile.
        with cudnn, torch._dynamo.config.patch(cache_size_limit=64):
            for _ in range(repeats):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                frames = decode(vae, latents)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        record |= {
            "first_s": times[0],
            "decode_s": times[-1],
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        }
        if reference is not None:
            diff = (frames.float() - reference.float()).abs()
            record |= {"mean_abs_255": diff.mean().item(), "max_abs_255": diff.max().item()}
        else:
            record["frames"] = frames
    except torch.OutOfMemoryError as exc:
        record["error"] = f"OOM: {str(exc)[:160]}"
    except Exception:  # noqa: BLE001 - a bench records what broke and goes on
        record["error"] = traceback.format_exc()[-600:]
    finally:
        masters[dtype_name].to("cpu")
        if "cl" in flags:
            channels_last(masters[dtype_name], torch.contiguous_format)
        if "compile" in flags:
            masters[dtype_name].decoder._compiled_call_impl = None  # `Module.compile` undone
        free_cuda()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--resolutions", default="1280x704x121,832x480x81")
    parser.add_argument("--variants", help="comma list, for one resolution (default: VARIANTS)")
    parser.add_argument("--repeats", type=int, default=2, help="decodes per variant, the last reported")
    args = parser.parse_args()
    from t2v.models import fullsize

    fp32 = fullsize.build("vae", dtype=torch.float32)
    bf16 = fullsize.build("vae", dtype=torch.float32).to(torch.bfloat16)
    masters = {"float32": fp32, "bfloat16": bf16}
    records: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for res in args.resolutions.split(","):
        frames, h, w = LATENTS[res]
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 48, frames, h, w, generator=gen)
        reference = None
        for variant in args.variants.split(",") if args.variants else VARIANTS[res]:
            record = run_variant(masters, res, variant, latents, reference, args.repeats)
            if reference is None:
                reference = record.pop("frames", None)
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "frames"}), flush=True)
            (args.out / "decoder_speed.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
