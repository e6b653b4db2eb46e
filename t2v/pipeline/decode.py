"""Decode: the latents to lossless RGB frames with the VAE."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from t2v import stages
from t2v.jobs import JobSpec
from t2v.pipeline import diffuse
from t2v.pipeline.stage import KeyInputs, Stage, Work, Writer
from t2v.plans import ComponentSizes, Placement, PlanOptions, StagePlan, option


@dataclass(frozen=True)
class DecodeOptions(PlanOptions):
    vae_dtype: str = option(
        "float32", label=lambda dtype: "bf16" if dtype == "bfloat16" else "fp32", moves_weights=True
    )
    vae_tile: int | None = option(None, label=lambda tile: f"tile{tile}" if tile else "whole")
    """Tile side in pixels for tiled decoding; None decodes whole frames."""

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        # Decoding needs the decoder half alone (an image job's first frame was encoded in the diffuse
        # stage): the encoder's 0.6 GB (fp32, full size) never goes to the card.
        module.encoder = None
        dtype = getattr(torch, self.vae_dtype)
        return module.to(dtype=dtype) if module.dtype != dtype else module

    def configure(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.vae_tile:
            module.enable_tiling(
                tile_sample_min_height=self.vae_tile,
                tile_sample_min_width=self.vae_tile,
                tile_sample_stride_height=self.vae_tile * 3 // 4,
                tile_sample_stride_width=self.vae_tile * 3 // 4,
            )
        else:
            module.disable_tiling()
        return module


def key(k: KeyInputs) -> dict[str, object]:
    return dict(model=k.model.identity)


def ladder(s: ComponentSizes, job: JobSpec, *, device: str, fp8: bool = False) -> list[StagePlan]:
    if not device.startswith("cuda"):
        cpu = StagePlan(STAGE.name, Placement.CPU, device="cpu", options=DecodeOptions())
        return [cpu, cpu.with_options(vae_tile=64)] if max(job.height, job.width) > 64 else [cpu]
    pixels = job.height * job.width

    def estimate(size: int, tile: int | None) -> int:
        # Whole frames, measured on an H100 (docs/benchmarks.md): ~6.5k activation values per pixel
        # decoded at once, one latent frame at a time with the causal cache carrying the rest. Tiles,
        # fitted to the H200's peaks at 1280x704x121 in bf16 (4.1 GiB with 256 px tiles, 5.3 with
        # 512, bench/decoder_speed.py): ~3.4k values per tile pixel, and the decoded tiles beside the
        # blended video hold ~4 copies of the output.
        out = 3 * job.frames * pixels * size
        if tile is None:
            return s.vae_params * size + 6_500 * size * pixels + 2 * out
        return s.vae_params * size + 3_500 * size * tile * tile + 4 * out

    # Order: speed, then fidelity. Whole frames in fp32 are the pipeline's own decode; measured on
    # random weights, tiles of 256 px moved frames by ~5/255 on average, 512 px tiles by ~2/255 and
    # 128 px tiles by ~14/255, bf16 by <1/255, so bf16 comes before smaller tiles. Fewer, larger tiles
    # are faster as well as closer: the decoder runs frame by frame per tile, so 15 tiles of 256 px at
    # 480P launch 5x the kernels of 3 tiles of 512 px and recompute ~1.7x the pixels in the overlaps
    # (8.8 s against 4.2 s whole; at 720P 20.8 s with 256 px tiles, 13.7 s with 512, docs/benchmarks.md).
    options = [
        ("float32", None),
        ("bfloat16", None),
        ("float32", 512),
        ("bfloat16", 512),
        ("float32", 256),
        ("bfloat16", 256),
        ("bfloat16", 128),
    ]
    return [
        StagePlan(
            STAGE.name,
            Placement.GPU,
            device=device,
            options=DecodeOptions(vae_dtype=dtype, vae_tile=tile),
            estimate_bytes=estimate(4 if dtype == "float32" else 2, tile),
        )
        for dtype, tile in options
        if not (tile and tile >= max(job.height, job.width))
    ]


def decoder_passes(vae: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """How many times diffusers' `AutoencoderKLWan` runs its decoder for latents of `shape`: once per
    latent frame, for each tile when tiling applies (its `_decode` and `tiled_decode` loops)."""
    _, _, frames, height, width = shape
    ratio = vae.spatial_compression_ratio
    tiled = getattr(vae, "use_tiling", False) and (
        width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio
    )
    if not tiled:
        return frames
    rows = math.ceil(height / (vae.tile_sample_stride_height // ratio))
    columns = math.ceil(width / (vae.tile_sample_stride_width // ratio))
    return frames * rows * columns


@contextmanager
def _passes_reported(work: Work, vae: torch.nn.Module, shape: tuple[int, ...]) -> Iterator[None]:
    """Report each decoder pass as a step (`Work.progress`), by a forward hook on the VAE's decoder,
    removed again: the component outlives the job."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        yield
        return
    total = decoder_passes(vae, shape)
    done = 0

    def count(module: torch.nn.Module, args: object, output: object) -> None:
        nonlocal done
        done += 1
        work.progress(done, max(total, done))  # never past its total, should diffusers' loop change

    work.progress(0, total)
    handle = decoder.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def compute(work: Work) -> Writer:
    latents = work.load_tensors(diffuse.STAGE)["latents"]
    vae = work.component()
    # cuDNN's heuristics choose the convolutions' kernels, not its autotuner (`cudnn.benchmark`):
    # PyTorch keeps the autotuner's choices per thread, and each stage task runs in a thread of its
    # own, so every job would search again. In a night's thread that search cost more than it saved
    # (480P with 512 px tiles: 14.4 s a decode against 3.8 s, docs/benchmarks.md).
    off = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False)
    with off, _passes_reported(work, vae, tuple(latents.shape)):
        frames = stages.decode_latents(vae, latents, device=work.device)
    run, stage, key, fps = work.run, work.stage, work.key, work.job.fps

    def write() -> None:  # ~100 MB per 480P clip: written once the card is free again
        with run.store.writing(stage, key) as temp:
            run.codec.write_frames(frames, temp, fps=fps)

    return write


STAGE = Stage(
    name="decode",
    output="frames",
    suffix=".mkv",
    summary="Decode the job's latents to lossless frames; returns their store key.",
    task_name="decode-frames",
    key=key,
    compute=compute,
    inputs=(diffuse.STAGE,),
    component="vae",
    ladder=ladder,
)
