"""Memory plans: where each stage's weights live and how they move, chosen from the VRAM there is.

`ladder(stage, sizes, job, device)` lists the plans for a stage fastest first, each with an estimate
of its peak; `choose(ladder, budget)` takes the first that fits and keeps the leaner ones behind it
for the out-of-memory fallback; `apply(plan, module)` puts a loaded component in place with diffusers'
own hooks (group offloading, layerwise casting, VAE tiling).

The estimates are weights on the card plus activations, with per-token coefficients measured on an
H100 with the full-size model (docs/benchmarks.md); each is a little above what was measured, and a
plan must fit in `HEADROOM` of the budget, the rest being left to the allocator's fragmentation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from t2v.errors import InvalidInput
from t2v.jobs import JobSpec

GiB = 2**30
HEADROOM = 0.75
"""Share of the budget a plan's estimate may use."""


class Placement(StrEnum):
    GPU = "gpu"
    """Weights resident on the card: fastest, needs the whole component."""
    GROUP = "group"
    """diffusers group offloading, one block at a time, the next prefetched on a CUDA stream from pinned
    host memory: about two blocks on the card."""
    LEAF = "leaf"
    """Group offloading per leaf module without prefetch: the smallest footprint, the slowest."""
    CPU = "cpu"
    """No GPU at all (CPU machine, or the last resort)."""


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs. Serialised as `name` into the run log."""

    stage: str
    placement: Placement
    device: str = "cuda"
    cfg_batch: int = 2
    """diffuse: conditional and unconditional passes as one batch of 2 (half the weight traffic when
    offloading) or as two batches of 1 (half the activations)."""
    shared_timestep: bool = True
    """diffuse: one timestep per sample instead of one per token (same values in text-to-video)."""
    ffn_chunks: int = 1
    """diffuse: the feed-forward run over this many slices of the sequence (its N x 14336 intermediate
    is the largest activation)."""
    fp8_storage: bool = False
    """diffuse: weights stored in float8_e4m3fn and cast to bf16 per layer; loses fidelity, opt-in."""
    record_stream: bool = False
    """group offload: let the allocator track prefetched weights per stream instead of synchronising
    before each group is dropped. Faster queueing, but freed blocks wait for the stream and the
    allocator reserves new ones meanwhile: reserved memory climbs to the cap (docs/benchmarks.md)."""
    resident_blocks: int = 0
    """diffuse under group offloading: this many transformer blocks, spread evenly, stay on the card
    and are never streamed; `choose` fills the budget's spare room with them (see `with_resident`)."""
    block_bytes: int = 0
    """diffuse under group offloading: bytes one more resident block costs."""
    blocks: int = 0
    """diffuse under group offloading: how many blocks the transformer has."""
    vae_dtype: str = "float32"
    vae_tile: int | None = None
    """decode: tile side in pixels for tiled decoding; None decodes whole frames."""
    estimate_bytes: int = 0

    @property
    def name(self) -> str:
        parts = [self.placement.value]
        if self.resident_blocks:
            parts.append(f"r{self.resident_blocks}")
        if self.stage == "diffuse":
            parts.append(f"cfg{self.cfg_batch}")
            if not self.shared_timestep:
                parts.append("token-ts")
            if self.ffn_chunks > 1:
                parts.append(f"ffn{self.ffn_chunks}")
            if self.fp8_storage:
                parts.append("fp8")
        if self.stage == "decode":
            parts.append("bf16" if self.vae_dtype == "bfloat16" else "fp32")
            parts.append(f"tile{self.vae_tile}" if self.vae_tile else "whole")
        return f"{self.stage}:{'-'.join(parts)}"

    @property
    def estimate_gib(self) -> float:
        return self.estimate_bytes / GiB


@dataclass(frozen=True)
class ComponentSizes:
    """What the estimates need to know of a model, read from its loaded components."""

    text_encoder_bytes: int
    text_embedding_bytes: int
    text_block_bytes: int
    text_dim: int
    text_ff_dim: int
    transformer_bytes: int
    transformer_block_bytes: int
    transformer_dim: int
    transformer_ffn_dim: int
    transformer_largest_leaf_bytes: int
    vae_params: int

    @classmethod
    def from_modules(cls, *, text_encoder=None, transformer=None, vae=None) -> ComponentSizes:
        te = module_bytes(text_encoder)
        tr = module_bytes(transformer)
        return cls(
            text_encoder_bytes=te,
            text_embedding_bytes=module_bytes(text_encoder.get_input_embeddings()) if text_encoder else 0,
            text_block_bytes=module_bytes(text_encoder.encoder.block[0]) if text_encoder else 0,
            text_dim=text_encoder.config.d_model if text_encoder else 0,
            text_ff_dim=text_encoder.config.d_ff if text_encoder else 0,
            transformer_bytes=tr,
            transformer_block_bytes=module_bytes(transformer.blocks[0]) if transformer else 0,
            transformer_dim=transformer.config.num_attention_heads * transformer.config.attention_head_dim
            if transformer
            else 0,
            transformer_ffn_dim=transformer.config.ffn_dim if transformer else 0,
            transformer_largest_leaf_bytes=max(
                (module_bytes(m) for m in transformer.modules() if not list(m.children())), default=0
            )
            if transformer
            else 0,
            vae_params=sum(p.numel() for p in vae.parameters()) if vae else 0,
        )


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters (0 for None); works on meta-device skeletons."""
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


def ladder(
    stage: str, sizes: ComponentSizes, job: JobSpec, *, device: str, texts: int = 2, fp8: bool = False
) -> list[StagePlan]:
    """Every plan for `stage`, fastest first, with estimates. On a CPU device the only plan is CPU."""
    if not device.startswith("cuda"):
        return [replace(p, fp8_storage=fp8 and stage == "diffuse") for p in _cpu_plans(stage, job)]
    plans = {"encode": _encode_plans, "diffuse": _diffuse_plans, "decode": _decode_plans}[stage](
        sizes, job, texts=texts, fp8=fp8
    )
    return [replace(p, device=device) for p in plans]


def choose(plans: list[StagePlan], budget_bytes: int) -> list[StagePlan]:
    """The first plan whose estimate fits the budget, followed by the leaner ones (the fallback order).

    A streaming plan that fits keeps as many blocks resident as the room left allows, with the same
    plan streaming every block right behind it. When none fits, the leanest GPU plan is still tried."""
    limit = int(budget_bytes * HEADROOM)
    for i, plan in enumerate(plans):
        if plan.estimate_bytes <= limit:
            filled = with_resident(plan, limit)
            return ([filled] if filled != plan else []) + plans[i:]
    return plans[-1:]


def with_resident(plan: StagePlan, limit: int) -> StagePlan:
    """`plan` with as many resident blocks as fit under `limit` bytes (streaming plans only).

    Every block kept on the card is ~1/30 of the weights not streamed each step, and the result is
    bit-identical (the same kernels on the same weights). Measured at 480P under 8 GiB with 12 of 30
    resident (docs/benchmarks.md): 0.66 s/step against 0.68 with none, before the stream-less group was
    kept on the card; 0.49 s/step after it, against 0.47 with every weight on the card."""
    if plan.placement is not Placement.GROUP or plan.block_bytes <= 0 or plan.blocks <= 2:
        return plan
    # Two blocks always stream (the one computing and the one prefetched), so at most blocks - 2 stay.
    spare = max(limit - plan.estimate_bytes, 0) // plan.block_bytes
    resident = int(min(spare, plan.blocks - 2))
    if resident <= 0:
        return plan
    return replace(
        plan, resident_blocks=resident, estimate_bytes=plan.estimate_bytes + resident * plan.block_bytes
    )


def _cpu_plans(stage: str, job: JobSpec) -> list[StagePlan]:
    # No card: RAM is the budget and it is ample for one component, but the same options exist, so
    # the out-of-memory fallback has somewhere to go (and is tested on this path).
    cpu = StagePlan(stage, Placement.CPU, device="cpu")
    if stage == "diffuse":
        return [cpu] + ([replace(cpu, cfg_batch=1)] if job.cfg else [])
    if stage == "decode" and max(job.height, job.width) > 64:
        return [cpu, replace(cpu, vae_tile=64)]
    return [cpu]


def _encode_plans(s: ComponentSizes, job: JobSpec, *, texts: int, fp8: bool) -> list[StagePlan]:
    tokens = texts * 512
    act = tokens * (s.text_dim * 4 * 8 + s.text_ff_dim * 4 * 3)
    return [
        StagePlan("encode", Placement.GPU, estimate_bytes=s.text_encoder_bytes + act),
        # The embedding table (2.1 GB at full size) is the largest piece that must come on at once.
        StagePlan(
            "encode", Placement.GROUP, estimate_bytes=s.text_embedding_bytes + 2 * s.text_block_bytes + act
        ),
        StagePlan("encode", Placement.LEAF, estimate_bytes=s.text_embedding_bytes + act),
    ]


def diffusion_tokens(job: JobSpec) -> int:
    return ((job.frames - 1) // 4 + 1) * (job.height // 32) * (job.width // 32)


def _diffuse_activation(s: ComponentSizes, job: JobSpec, *, batch: int, shared: bool, ffn_chunks: int) -> int:
    n = diffusion_tokens(job)
    # Bytes per token and sample, fitted to the full-size model on an H100 (docs/benchmarks.md):
    # 86 kB allocated with the FFN whole, 72 kB with it in 4 chunks, so ~22 dim-wide bytes-per-channel
    # (fp32 norms and residuals, bf16 q/k/v and attention output) plus ~1.3 bytes per FFN channel that
    # chunking divides.
    per_token = 22 * s.transformer_dim + 1.3 * s.transformer_ffn_dim / ffn_chunks
    if not shared:
        per_token += 6 * s.transformer_dim * 4 * 1.5  # the per-token fp32 timestep projection
    # Reserved runs 20-30% above allocated while weights stream in on a second CUDA stream (each stream
    # has its own pool in PyTorch's caching allocator): measured +0.5 GiB at 480P, +0.9-1.5 GiB at 720P.
    return int(1.3 * batch * n * per_token)


def _diffuse_plans(s: ComponentSizes, job: JobSpec, *, texts: int, fp8: bool) -> list[StagePlan]:
    weights = s.transformer_bytes // (2 if fp8 else 1)
    block = s.transformer_block_bytes // (2 if fp8 else 1)
    blocks = max(1, round(s.transformer_bytes / max(s.transformer_block_bytes, 1)))
    non_block = max(s.transformer_bytes - blocks * s.transformer_block_bytes, 0)
    streamed = non_block + 2 * block  # the unmatched group, the block computing, the block prefetched
    # (batch, ffn_chunks) fastest first: CFG as one batch halves the weight traffic of offloading,
    # chunking the FFN costs little; two passes double the traffic.
    shapes = [(2, 1), (2, 4), (1, 1), (1, 8)] if job.cfg else [(1, 1), (1, 8)]
    plans = []
    for placement, resident in ((Placement.GPU, weights), (Placement.GROUP, streamed)):
        streaming = placement is Placement.GROUP
        for batch, chunks in shapes:
            act = _diffuse_activation(s, job, batch=batch, shared=True, ffn_chunks=chunks)
            plans.append(
                StagePlan(
                    "diffuse",
                    placement,
                    cfg_batch=batch,
                    ffn_chunks=chunks,
                    fp8_storage=fp8,
                    block_bytes=block if streaming else 0,
                    blocks=blocks if streaming else 0,
                    estimate_bytes=resident + act,
                )
            )
    act = _diffuse_activation(s, job, batch=1, shared=True, ffn_chunks=8)
    plans.append(
        StagePlan(
            "diffuse",
            Placement.LEAF,
            cfg_batch=1,
            ffn_chunks=8,
            fp8_storage=fp8,
            estimate_bytes=2 * s.transformer_largest_leaf_bytes + act,
        )
    )
    return plans


def _decode_plans(s: ComponentSizes, job: JobSpec, *, texts: int, fp8: bool) -> list[StagePlan]:
    pixels = job.height * job.width

    def estimate(size: int, tile: int | None) -> int:
        # Measured on an H100 (docs/benchmarks.md): ~6.5k activation values per pixel decoded at once
        # (a whole frame, or one tile), one latent frame at a time with the causal cache carrying the
        # rest; tiling also holds the decoded tiles and the blended video (~3.5 copies of the output).
        out = 3 * job.frames * pixels * size
        if tile is None:
            return s.vae_params * size + 6_500 * size * pixels + 2 * out
        return s.vae_params * size + 6_500 * size * tile * tile + int(3.5 * out)

    # Order: speed, then fidelity. Whole frames in fp32 are the pipeline's own decode; measured on
    # random weights, tiles of 256 px moved frames by ~5/255 on average and 128 px tiles by ~14/255,
    # bf16 by <1/255, so bf16 comes before smaller tiles. Fewer, larger tiles are faster as well as
    # closer: the decoder runs frame by frame per tile, so 15 tiles of 256 px at 480P launch 5x the
    # kernels of 3 tiles of 512 px and recompute ~1.7x the pixels in the overlaps (8.8 s against
    # 4.2 s whole, docs/benchmarks.md).
    options = [
        ("float32", None),
        ("bfloat16", None),
        ("float32", 512),
        ("bfloat16", 512),
        ("float32", 256),
        ("bfloat16", 256),
        ("bfloat16", 128),
    ]
    plans = []
    for dtype, tile in options:
        if tile and tile >= max(job.height, job.width):
            continue
        size = 4 if dtype == "float32" else 2
        plans.append(
            StagePlan(
                "decode", Placement.GPU, vae_dtype=dtype, vae_tile=tile, estimate_bytes=estimate(size, tile)
            )
        )
    return plans


# --- putting a plan in place ---------------------------------------------------------------------


COMPILE_PAYS_AFTER_STEPS = 200
"""Measured on an H100 under the 8 GiB plan at 480P (docs/benchmarks.md): compiling the repeated block
cost 15.8 s on the first step and made each step 0.11 s faster (0.49 -> 0.39 s): it pays back after
~150 steps, so a run compiles from 200 steps on (four 50-step clips). Compiled kernels round
differently: the latents moved 3.3% after 3 steps on random weights, as other kernel choices do."""


def compile_pays(steps: Iterable[int], mode: str = "auto") -> bool:
    """Whether to `torch.compile` the transformer's blocks for a run with these jobs' step counts.

    `mode` is `auto`, `on` or `off` (T2V_COMPILE); raises InvalidInput for anything else."""
    if mode not in ("auto", "on", "off"):
        raise InvalidInput(f"T2V_COMPILE has to be auto, on or off but is {mode!r}.")
    if mode != "auto":
        return mode == "on"
    return sum(steps) >= COMPILE_PAYS_AFTER_STEPS


def residency_key(plan: StagePlan) -> str:
    """What decides where a component's weights are: plans with the same key can share a loaded
    component (its pinned host copies and hooks), whatever their CFG batch, FFN chunks or VAE tiles."""
    return (
        f"{plan.stage}|{plan.placement.value}|{plan.device}|fp8={plan.fp8_storage}|{plan.vae_dtype}"
        f"|resident={plan.resident_blocks}"
    )


def apply(plan: StagePlan, module: torch.nn.Module) -> torch.nn.Module:
    """Place a freshly loaded (CPU) component as the plan says, then `configure` it; returns it."""
    device = torch.device(plan.device)
    if plan.stage == "decode":
        dtype = getattr(torch, plan.vae_dtype)
        module = module.to(device=device, dtype=dtype) if module.dtype != dtype else module.to(device)
        return configure(plan, module)
    if plan.stage == "diffuse":
        # Wrapped before the hooks go on, so that leaf-level offloading sees the final module tree.
        chunk_feed_forward(module, plan.ffn_chunks)
        if plan.fp8_storage:
            module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=module.dtype)
    if plan.placement in (Placement.GPU, Placement.CPU):
        return configure(plan, module.to(device))
    from diffusers.hooks import apply_group_offloading

    leaf = plan.placement is Placement.LEAF
    # UMT5EncoderModel keeps its blocks one level down (encoder.block): block-level offloading of the
    # whole model sees no ModuleList and moves the 11 GB encoder as one group, and naming `encoder` in
    # `block_modules` nests two stream prefetch hooks, which diffusers 0.42 refuses. Offloading the
    # stack itself works: its unmatched group holds the embedding, which `shared` ties to.
    target = module.encoder if plan.stage == "encode" and not leaf and hasattr(module, "encoder") else module
    with _resident_blocks_hidden(target, plan.resident_blocks) as resident:
        apply_group_offloading(
            target,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level" if leaf else "block_level",
            num_blocks_per_group=None if leaf else 1,
            use_stream=not leaf,
            non_blocking=not leaf,
            record_stream=plan.record_stream and not leaf,
        )
    for block in resident:
        block.to(device)
    if not leaf:
        _keep_unmatched_on_card(target, device)
    return configure(plan, module)


def _keep_unmatched_on_card(module: torch.nn.Module, device: torch.device) -> None:
    """Leave the modules outside the streamed blocks on the card after their first use.

    Block-level offloading puts them (the transformer's embedders and output head, 0.1 GB; UMT5's
    2.1 GB token embedding) in one group without a stream, which diffusers copies host-to-device
    before every forward and device-to-host after it, both from pageable memory: 2 x 2.1 GB per text
    encoded. The planner's estimates already count them as on the card."""
    from diffusers.hooks import HookRegistry

    hook = HookRegistry.check_if_exists_or_initialize(module).get_hook("group_offloading")
    if hook is not None and hook.group.stream is None:
        hook.group.offload_device = device


def resident_indices(blocks: int, resident: int) -> list[int]:
    """Which of `blocks` stay on the card: spread evenly, so that every streamed block's prefetch has
    the compute of the resident ones before it to hide behind."""
    resident = max(0, min(resident, blocks))
    return [i for i in range(blocks) if (i + 1) * resident // blocks > i * resident // blocks]


@contextmanager
def _resident_blocks_hidden(module: torch.nn.Module, resident: int) -> Iterator[list[torch.nn.Module]]:
    """While inside, `module.blocks` lists only the blocks to stream, so that group offloading hooks
    those alone (and pins only their weights); the full list is back on exit. Yields the resident ones.

    diffusers' block-level offloading groups every member of a ModuleList and has no way to leave
    some out; its prefetch chain is traced on the first forward from the modules that carry its hook,
    so blocks without one simply run where they are."""
    if resident <= 0 or not isinstance(getattr(module, "blocks", None), torch.nn.ModuleList):
        yield []
        return
    blocks = module.blocks
    keep = set(resident_indices(len(blocks), resident))
    module.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i not in keep])
    try:
        yield [blocks[i] for i in sorted(keep)]
    finally:
        module.blocks = blocks


def configure(plan: StagePlan, module: torch.nn.Module) -> torch.nn.Module:
    """The plan's cheap switches on an already placed component: FFN chunks, VAE tiles."""
    if plan.stage == "diffuse":
        chunk_feed_forward(module, plan.ffn_chunks)
    if plan.stage == "decode":
        if plan.vae_tile:
            module.enable_tiling(
                tile_sample_min_height=plan.vae_tile,
                tile_sample_min_width=plan.vae_tile,
                tile_sample_stride_height=plan.vae_tile * 3 // 4,
                tile_sample_stride_width=plan.vae_tile * 3 // 4,
            )
        else:
            module.disable_tiling()
    return module


class ChunkedFeedForward(torch.nn.Module):
    """Runs a token-wise feed-forward over slices of the sequence: same result, 1/n of its peak."""

    def __init__(self, ff: torch.nn.Module, chunks: int) -> None:
        super().__init__()
        self.ff = ff
        self.chunks = chunks

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.chunks <= 1:
            return self.ff(hidden_states, *args, **kwargs)
        pieces = hidden_states.chunk(self.chunks, dim=1)
        return torch.cat([self.ff(piece, *args, **kwargs) for piece in pieces], dim=1)


def chunk_feed_forward(transformer: torch.nn.Module, chunks: int) -> None:
    """Run every block's feed-forward in `chunks` slices (1: whole); wraps each FFN the first time."""
    for block in transformer.blocks:
        if not isinstance(block.ffn, ChunkedFeedForward):
            block.ffn = ChunkedFeedForward(block.ffn, chunks)
        block.ffn.chunks = chunks
