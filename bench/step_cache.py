"""Speed and latent deviation of a step cache (MagCache by default) on one denoise of Wan2.2 TI2V-5B.

`measure` is the snippet: the same denoise (`t2v.stages.denoise`, as the diffuse stage calls it) from
the same latents, without and then with the cache, each timed with the card synchronised. The CLI
builds the full-size transformer with random weights on the card (`t2v.models.fullsize`) and random
prompt embeddings, or loads a folder's (`--model`) and encodes `--prompt` with its text encoder. On
random weights only the speed and how far the latents move mean anything; which steps MagCache skips
follows from its ratios alone (`step_caches.skipped_steps`), so its share of skipped passes is the real
model's. An image job's first frame is a random latent here.

    python bench/step_cache.py --out bench/results/step_cache.json          # a GPU: 832x480x81, 50 steps
    python bench/step_cache.py --settings mag,mag:0.1,0.12 --image --out ...  # more caches; i2v ratios
    python bench/step_cache.py --model tiny --steps 10                        # CPU smoke run
    python bench/step_cache.py --model FOLDER --calibrate [--image]           # a checkpoint's own ratios
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# t2v first: its PYTORCH_CUDA_ALLOC_CONF is set before torch touches the card (bench/gpu_memory.py).
import t2v  # noqa: E402, F401

# isort: split
import torch  # noqa: E402

from t2v import frame_timesteps as per_frame  # noqa: E402
from t2v import stages, step_caches  # noqa: E402
from t2v.models import fullsize, registry  # noqa: E402
from t2v.models.wan22 import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from t2v.pipeline.diffuse import step_cache  # noqa: E402


def _per_frame(transformer: torch.nn.Module, image: bool) -> None:
    """The image path's one timestep per latent frame, installed before any cache as the diffuse stage
    does (`DiffuseOptions.prepare`): its block hooks compute the block themselves, so a cache hook
    registered before them would never be called."""
    if image:
        per_frame.install(transformer)


def _denoise(
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    steps: int,
    *,
    guidance: float,
    condition: torch.Tensor | None,
    cfg_batch: int,
) -> tuple[torch.Tensor, float]:
    """The diffuse stage's denoise (an image job's path with `condition`) and its seconds, synchronised."""
    image = condition is not None
    cuda = latents.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = stages.denoise(
        transformer,
        copy.deepcopy(scheduler),  # a fresh one each run: its multistep history is per run
        latents,
        cond,
        uncond,
        steps=steps,
        guidance=guidance,
        compute_dtype=transformer.dtype,
        shared_timestep=not image,
        cfg_batch=cfg_batch,
        condition=condition,
        frame_timesteps=image,
    )
    if cuda:
        torch.cuda.synchronize()
    return out.float(), time.perf_counter() - start


def measure(
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    steps: int = 50,
    *,
    setting: float | str = "mag",
    guidance: float = 5.0,
    condition: torch.Tensor | None = None,
    cfg_batch: int = 2,
    warmup_steps: int = 2,
) -> dict:
    """One `steps`-step denoise without and with the step cache `setting` (a `step_cache` value);
    `condition` (a first-frame latent) makes it an image job, with the picture ratios. Seconds,
    speed-up, and the cached latents' relative L2 and max abs deviation from the uncached ones."""
    image = condition is not None
    _per_frame(transformer, image)
    common = dict(guidance=guidance, condition=condition, cfg_batch=cfg_batch)
    if warmup_steps:  # kernels chosen, allocator warmed: part of neither timing
        _denoise(transformer, scheduler, latents, cond, uncond, warmup_steps, **common)
    plain, plain_s = _denoise(transformer, scheduler, latents, cond, uncond, steps, **common)
    with step_cache(transformer, setting, steps=steps, image=image):
        cached, cached_s = _denoise(transformer, scheduler, latents, cond, uncond, steps, **common)
    config = step_caches.config(setting, steps=steps, image=image)
    skipped = step_caches.skipped_steps(config) if hasattr(config, "mag_ratios") else None
    return dict(
        setting=setting,
        steps=steps,
        image=image,
        cfg_batch=cfg_batch,
        uncached_s=plain_s,
        cached_s=cached_s,
        speedup=plain_s / cached_s,
        skipped_steps=skipped,  # MagCache's, known beforehand; None for the first-block cache
        latents_rel_l2=float((cached - plain).norm() / plain.norm()),
        latents_max_abs=float((cached - plain).abs().max()),
        uncached_max_abs=float(plain.abs().max()),
    )


def calibrate(
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    steps: int = 50,
    *,
    guidance: float = 5.0,
    condition: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """diffusers' MagCache calibration on one denoise: nothing is skipped, and each pass's per-step
    ratios (the first 1.0, as `MagCacheConfig.mag_ratios` takes them) are what diffusers prints at its
    end. CFG as two passes, so cond and uncond each get their own: {"cond": [...], "uncond": [...]}."""
    from diffusers import MagCacheConfig

    _per_frame(transformer, condition is not None)
    printed = io.StringIO()
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(printed):  # diffusers prints them; it returns nothing
            _denoise(
                transformer,
                scheduler,
                latents,
                cond,
                uncond,
                steps,
                guidance=guidance,
                condition=condition,
                cfg_batch=1,
            )
    finally:
        transformer.disable_cache()
    # cond's last step ends before uncond's: the printed lists come in that order.
    lines = printed.getvalue().splitlines()
    lists = [ast.literal_eval(line) for line in lines if line.startswith("[") and "MagCache" not in line]
    return dict(zip(("cond", "uncond"), lists, strict=False))


def _inputs(args: argparse.Namespace) -> tuple:
    """The transformer on its device, its scheduler, and the prompt embeddings: the folder's text
    encoder's for a real model (then freed), random ones for the tiny and random-weight models."""
    ref = registry.resolve_model(args.model)
    device = "cpu" if ref.kind == "tiny" else "cuda"
    if ref.kind == "random":  # built on the card, where the registry's keeps a host master
        transformer = fullsize.build("transformer", device=device, keep_on=device)
    else:
        transformer = registry.load_transformer(ref).to(device)
    if ref.builtin:
        gen = torch.Generator().manual_seed(0)
        shape = (1, ref.rules.max_sequence_length, transformer.config.text_dim)
        cond, uncond = (torch.randn(*shape, generator=gen).to(device, transformer.dtype) for _ in range(2))
    else:
        encoder = registry.load_text_encoder(ref).to(device)
        texts = [args.prompt, DEFAULT_NEGATIVE_PROMPT]
        both = stages.encode_texts(
            encoder, registry.load_tokenizer(ref), texts, device=device, max_sequence_length=512
        )
        cond, uncond = both[:1], both[1:]
        del encoder
        torch.cuda.empty_cache()
    return ref, device, transformer, registry.load_scheduler(ref), cond, uncond


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=registry.RANDOM_FULL_SIZE,
        help="tiny (CPU), the full-size architecture with random weights (default), or a TI2V-5B folder",
    )
    parser.add_argument("--prompt", default="a red fox running through snow", help="for a real folder")
    parser.add_argument("--size", default="832x480x81", help="WIDTHxHEIGHTxFRAMES (tiny: 96x64x9)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--settings", default="mag", help="comma-separated step_cache values")
    parser.add_argument("--image", action="store_true", help="an image job: i2v ratios, a random first frame")
    parser.add_argument("--cfg-batch", type=int, default=2, choices=(1, 2))
    parser.add_argument("--calibrate", action="store_true", help="print the model's own MagCache ratios")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args()
    if args.model == registry.BUILTIN and args.size == parser.get_default("size"):
        args.size = "96x64x9"
    width, height, frames = (int(v) for v in args.size.split("x"))
    ref, device, transformer, scheduler, cond, uncond = _inputs(args)
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=height, width=width, frames=frames)
    latents = stages.initial_noise(shape, seed=0, device=device)
    gen = torch.Generator().manual_seed(1)
    condition = torch.randn(*shape[:2], 1, *shape[3:], generator=gen).to(device) if args.image else None
    if args.calibrate:
        print(
            json.dumps(
                calibrate(transformer, scheduler, latents, cond, uncond, args.steps, condition=condition)
            )
        )
        return
    records = []
    for text in args.settings.split(","):
        setting = step_caches.from_text(text)
        record = measure(
            transformer,
            scheduler,
            latents,
            cond,
            uncond,
            args.steps,
            setting=setting,
            condition=condition,
            cfg_batch=args.cfg_batch,
        )
        record.update(model=ref.identity, size=args.size, device=device)
        if device == "cuda":
            record["gpu"] = torch.cuda.get_device_name(0)
        print(json.dumps(record), flush=True)
        records.append(record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
