"""Decode: the latents to lossless RGB frames with the VAE."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook

from t2v import stages
from t2v.jobs import JobSpec
from t2v.pipeline import diffuse
from t2v.pipeline.stage import KeyInputs, Stage, Work, Writer
from t2v.plans import ComponentSizes, Placement, PlanOptions, StagePlan, option

GRID = 16
"""Tile sides and strides are multiples of this many pixels: the VAE's spatial stride (16 for Wan2.2's
VAE, 8 for Wan2.1's), so that every tile starts on a latent pixel."""
WIDE = 256
"""Tiles narrower than this on either side are tried only where no wider tiles fit."""
HOST_COST = 1.2
"""A decode blended on the host takes this much longer than on the card for the same tiles: at
1280x704x121, 1.18-1.24x the time the tiles' pixels predict from whole frames (docs/benchmarks.md)."""
MIN_STRIDE = 96
"""The GPU's smallest tiles (128 px with their overlap): below it the decoder's kernel launches, per
tile and latent frame, dominate."""


@dataclass(frozen=True)
class Tiles:
    """How diffusers' tiled decode covers one frame size: tiles of `height` x `width` pixels every
    `stride_height` / `stride_width`; the rest of each tile overlaps its neighbour and is blended."""

    height: int
    width: int
    stride_height: int
    stride_width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def _round_up(pixels: int) -> int:
    return -(-pixels // GRID) * GRID


def _axis(size: int, count: int) -> tuple[int, int]:
    """(tile, stride) for `count` tiles of even size along `size` pixels. The overlap is a third of the
    stride up to 128 px: the 512 px tiles' 128 px kept seams at ~2/255, and a wider blend only
    recomputes more."""
    if count == 1:
        return _round_up(size), _round_up(size)
    stride = _round_up(math.ceil(size / count))
    return min(stride + min(128, _round_up(stride // 3)), _round_up(size)), stride


def _extent(size: int, tile: int, stride: int) -> int:
    """Pixels decoded along an axis: each tile, the last one cut at the frame's edge."""
    return sum(min(tile, size - start) for start in range(0, size, stride))


def decoded_pixels(height: int, width: int, tiles: Tiles) -> int:
    """Pixels per frame the decoder runs on in `tiles`, overlaps included."""
    rows = _extent(height, tiles.height, tiles.stride_height)
    return rows * _extent(width, tiles.width, tiles.stride_width)


def _sliver(size: int, stride: int) -> bool:
    """Whether the last tile along an axis is under half a stride wide (a pass for a few pixels)."""
    return stride < size and size - (size - 1) // stride * stride < stride // 2


def tilings(height: int, width: int, *, min_stride: int = MIN_STRIDE) -> list[Tiles]:
    """The tilings of a `height` x `width` frame worth trying, fastest first (tiles under `WIDE` a side
    after the others): even grids of tiles, each kept only if its tiles are smaller than every earlier
    one's (what a tighter card needs).

    Fast means few decoded pixels: the decoder's work grows with the pixels of every tile, overlaps
    included. diffusers' own grid of fixed tiles leaves a thin last column (at 1280x704, 512 px tiles
    every 384 px decode 1.5x the frame's pixels in 8 tiles); an even grid spreads the frame over its
    tiles, so that the tiles a card holds decode fewer pixels."""
    grids = {}
    for rows in range(1, max(height // min_stride, 1) + 1):
        for columns in range(1, max(width // min_stride, 1) + 1):
            if rows == columns == 1:
                continue
            (tile_h, stride_h), (tile_w, stride_w) = _axis(height, rows), _axis(width, columns)
            if max(tile_h, tile_w) > 2 * min(tile_h, tile_w):
                continue  # a thin strip sees too little of the frame across it: visible seams
            if _sliver(height, stride_h) or _sliver(width, stride_w):
                continue  # strides rounded to the grid can leave a last tile of a few pixels
            tiles = Tiles(tile_h, tile_w, stride_h, stride_w)
            grids[tiles] = decoded_pixels(height, width, tiles)
    kept: list[Tiles] = []
    # Tiles with a side under `WIDE` come after all others, as leaner fallbacks: at 1280x704 tiles of
    # 320x192 decoded fewer pixels than 256 px ones but no faster, with seams further off (6.8/255
    # against 5.9, docs/benchmarks.md).
    for tiles in sorted(grids, key=lambda t: (min(t.height, t.width) < WIDE, grids[t], t.pixels)):
        if all(tiles.pixels < faster.pixels for faster in kept):
            kept.append(tiles)
    return kept


@dataclass(frozen=True)
class DecodeOptions(PlanOptions):
    vae_dtype: str = option(
        "float32", label=lambda dtype: "bf16" if dtype == "bfloat16" else "fp32", moves_weights=True
    )
    vae_tiles: Tiles | None = option(
        None, label=lambda tiles: f"tile{tiles.height}x{tiles.width}" if tiles else "whole"
    )
    """The tiling of the job's frame for tiled decoding (`tilings`); None decodes whole frames."""
    tiles_to_host: bool = option(False, label=lambda on: "host" if on else None)
    """Tiled: each decoded piece goes to host memory as the decoder returns it, and diffusers blends the
    tiles there (`TilesToHost`). The card then holds one tile's work, not the whole video several
    times over, so that larger, faster tiles fit."""

    def prepare(self, module: torch.nn.Module, whole_to: torch.device | None = None) -> torch.nn.Module:
        # Decoding needs the decoder half alone (an image job's first frame was encoded in the diffuse
        # stage): the encoder's 0.6 GB (fp32, full size) never goes to the card.
        module.encoder = None
        if whole_to is not None:
            # Cast on the card: the host's cast and channels-last copy of the 2.2 GB decoder took
            # most of the decode stage's placing (docs/benchmarks.md); the fp32 weights it holds
            # meanwhile are under the decode's own peak.
            module = module.to(whole_to)
        dtype = getattr(torch, self.vae_dtype)
        module = module.to(dtype=dtype) if module.dtype != dtype else module
        if dtype == torch.bfloat16:
            # cuDNN's channels-last kernels: 6-12% faster bf16 decodes at 720P and no further from
            # fp32 frames (docs/benchmarks.md). fp32 stays as the pipeline runs it.
            channels_last(module)
        return module

    def configure(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.vae_tiles:
            module.enable_tiling(
                tile_sample_min_height=self.vae_tiles.height,
                tile_sample_min_width=self.vae_tiles.width,
                tile_sample_stride_height=self.vae_tiles.stride_height,
                tile_sample_stride_width=self.vae_tiles.stride_width,
            )
        else:
            module.disable_tiling()
        registry = HookRegistry.check_if_exists_or_initialize(module.decoder)
        if registry.get_hook(TilesToHost.NAME) is not None:
            registry.remove_hook(TilesToHost.NAME)  # the component outlives the job: each sets its own
        if self.vae_tiles and self.tiles_to_host:
            registry.register_hook(TilesToHost(), TilesToHost.NAME)
        return module


def channels_last(module: torch.nn.Module, fmt: torch.memory_format | None = None) -> None:
    """Convolution weights to channels-last (3D for Conv3d), or all to `fmt`: `Module.to` applies one
    format to every 4D and 5D tensor, and the VAE has both."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv3d):
            layer.to(memory_format=fmt or torch.channels_last_3d)
        elif isinstance(layer, torch.nn.Conv2d):
            layer.to(memory_format=fmt or torch.channels_last)


class TilesToHost(ModelHook):
    """Moves the decoder's output to host memory as it returns (a diffusers hook on `vae.decoder`).

    diffusers' tiled decode keeps every decoded tile on the card until it blends them, then concatenates
    rows, the frame, unpatchifies and clamps it: at 1280x704x121 in bf16 about four copies of the
    0.65 GB video (docs/benchmarks.md). With the decoder's pieces (one latent frame of one tile each) on
    the host, all of that runs there and the card holds the decoder's work on one tile.

    Each piece is copied asynchronously into page-locked memory, and the card is waited for only at a
    tile's last piece (`passes_per_tile`, set by `decode_frames`), where diffusers concatenates the tile's
    pieces on the host. A copy that waited for every piece left the card idle while the host queued the
    next pass's first kernels: 8.2 s against 7.4 for the same tiles blended on the card at 720P
    (docs/benchmarks.md). Unknown, every piece is waited for."""

    NAME = "t2v_tiles_to_host"

    def __init__(self) -> None:
        super().__init__()
        self.passes_per_tile: int | None = None
        self._passes = 0

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if kwargs.get("first_chunk"):  # a tile's first latent frame (diffusers' tiled_decode)
            self._passes = 0
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        self._passes += 1
        if output.device.type != "cpu":
            host = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
            output = host.copy_(output, non_blocking=True)
        if self.passes_per_tile is None or self._passes >= self.passes_per_tile:
            self.wait()
        return output

    def wait(self) -> None:
        """The pieces copied so far are on the host: the tile's concatenation may read them."""
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()


def decode_frames(vae: torch.nn.Module, latents: torch.Tensor, *, device: torch.device | str) -> np.ndarray:
    """`stages.decode_latents`, with a `TilesToHost` hook told how many pieces make a tile: the latent
    frames, the decoder running once per latent frame of each tile. Where the latents fit one tile,
    diffusers decodes whole frames and concatenates each piece as it comes: every piece is waited for."""
    hook = HookRegistry.check_if_exists_or_initialize(vae.decoder).get_hook(TilesToHost.NAME)
    if hook is not None:
        hook.passes_per_tile = latents.shape[2] if decodes_in_tiles(vae, tuple(latents.shape)) else None
    return stages.decode_latents(vae, latents, device=device)


def key(k: KeyInputs) -> dict[str, object]:
    return dict(model=k.model.identity)


def estimate(
    s: ComponentSizes, job: JobSpec, *, dtype: str, tiles: Tiles | None, to_host: bool = False
) -> int:
    """Card bytes of decoding `job` in `dtype`, whole frames or in `tiles`, blended on the card or
    (`to_host`) on the host.

    Whole frames, measured on an H100 (docs/benchmarks.md): ~6.5k activation values per pixel decoded
    at once, one latent frame at a time with the causal cache carrying the rest. Tiles, fitted to the
    H200's peaks at 1280x704x121 in bf16 (4.1 GiB with 256 px tiles, 5.3 with 512,
    bench/decoder_speed.py): ~3.4k values per tile pixel, and the decoded tiles beside the blended
    video hold ~4 copies of the output. Blended on the host, the card holds the tile's work, fitted to
    the reserved peaks with host blending (5.4 GiB at 1280x704 with 704x432 tiles, 4.7 at 832x480
    with 480x544, 3.6 with 480x384): ~4.4k values per tile pixel, and the frames being converted to
    uint8 (`stages.frames_uint8`)."""
    size = torch.finfo(getattr(torch, dtype)).bits // 8
    pixels = job.height * job.width
    out = 3 * job.frames * pixels * size
    if tiles is None:
        return s.vae_params * size + 6_500 * size * pixels + 2 * out
    if to_host:
        converting = 3 * min(job.frames, stages.FRAMES_AT_ONCE) * pixels * (size + 4 + 1)
        return s.vae_params * size + 4_400 * size * tiles.pixels + converting
    return s.vae_params * size + 3_500 * size * tiles.pixels + 4 * out


def ladder(
    s: ComponentSizes, job: JobSpec, *, device: str, fp8: bool = False, night: Sequence[JobSpec] = ()
) -> list[StagePlan]:
    if not device.startswith("cuda"):
        cpu = StagePlan(STAGE.name, Placement.CPU, device="cpu", options=DecodeOptions())
        leanest = tilings(job.height, job.width, min_stride=3 * GRID)[-1:]  # none for 64 px frames
        return [cpu, *(cpu.with_options(vae_tiles=tiles) for tiles in leanest)]
    # Whole frames first: fp32 is the pipeline's own decode, bf16 moved frames by <1/255 on random
    # weights. Then tiles, in bf16 alone: their seams move frames by ~2/255 (512 px) to ~14/255 (128 px)
    # against whole frames, so fp32's extra fidelity is lost in them and it needs twice the room. Fewer,
    # larger tiles are faster as well as closer: the decoder runs frame by frame per tile, so 15 tiles
    # of 256 px at 480P launch 5x the kernels of 3 tiles of 512 px and recompute ~1.7x the pixels in the
    # overlaps (8.8 s against 4.2 s whole; at 720P 20.8 s with 256 px tiles, 13.7 s with 512,
    # docs/benchmarks.md). Each tiling is blended on the card or on the host (`TilesToHost`): slower
    # for the same tiles, but it leaves the card room for larger ones.
    tiled = [(t, host) for t in tilings(job.height, job.width) for host in (False, True)]
    # Fastest first by the pixels decoded, host blending at its measured cost; narrow tiles stay last.
    tiled.sort(
        key=lambda th: (
            min(th[0].height, th[0].width) < WIDE,
            decoded_pixels(job.height, job.width, th[0]) * (HOST_COST if th[1] else 1.0),
        )
    )
    plans = [_gpu_plan(s, job, device, "float32"), _gpu_plan(s, job, device, "bfloat16")]
    for tiles, host in tiled:
        plan = _gpu_plan(s, job, device, "bfloat16", tiles, host)
        if plan.estimate_bytes < min(p.estimate_bytes for p in plans):  # a slower plan must be leaner
            plans.append(plan)
    return plans


def _gpu_plan(
    s: ComponentSizes, job: JobSpec, device: str, dtype: str, tiles: Tiles | None = None, host: bool = False
) -> StagePlan:
    return StagePlan(
        STAGE.name,
        Placement.GPU,
        device=device,
        options=DecodeOptions(vae_dtype=dtype, vae_tiles=tiles, tiles_to_host=host),
        estimate_bytes=estimate(s, job, dtype=dtype, tiles=tiles, to_host=host),
    )


def decoder_passes(vae: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """How many times diffusers' `AutoencoderKLWan` runs its decoder for latents of `shape`: once per
    latent frame, for each tile when tiling applies (its `_decode` and `tiled_decode` loops)."""
    _, _, frames, height, width = shape
    if not decodes_in_tiles(vae, shape):
        return frames
    ratio = vae.spatial_compression_ratio
    rows = math.ceil(height / (vae.tile_sample_stride_height // ratio))
    columns = math.ceil(width / (vae.tile_sample_stride_width // ratio))
    return frames * rows * columns


def decodes_in_tiles(vae: torch.nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether diffusers' `AutoencoderKLWan.decode` takes its tiled path for latents of `shape`: tiling
    on, and the latents larger than one tile."""
    height, width = shape[-2:]
    ratio = vae.spatial_compression_ratio
    return getattr(vae, "use_tiling", False) and (
        width > vae.tile_sample_min_width // ratio or height > vae.tile_sample_min_height // ratio
    )


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
        frames = decode_frames(vae, latents, device=work.device)
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
