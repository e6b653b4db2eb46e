"""Memory plans: where a stage's weights live and how they move, chosen from the VRAM there is.

Each stage (`t2v.pipeline`) lists its plans fastest first with an estimate of their peak (its
`ladder`); `choose(ladder, budget)` takes the first that fits and keeps the leaner ones behind it for
the out-of-memory fallback; `t2v.placement.apply(plan, module)` puts a loaded component in place with
diffusers' own hooks (group offloading, layerwise casting, VAE tiling).

A plan is a placement plus the stage's own options, a small typed dataclass per stage (like diffusers'
`GroupOffloadingConfig`). Its name (in the run log and in `T2V_INJECT_OOM` patterns) and its residency
key (which plans can share a loaded component) are derived from the fields, so they cannot drift.

The estimates are weights on the card plus activations, with per-token coefficients measured on an
H100 with the full-size model (docs/benchmarks.md); each is a little above what was measured, and a
plan must fit in `HEADROOM` of the budget, the rest being left to the allocator's fragmentation.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

import torch

from t2v.errors import InvalidInput
from t2v.models import registry
from t2v.models.registry import ModelRef
from t2v.settings import COMPILE_MODES

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


class HostPlacement(StrEnum):
    """Where a component's weights wait in host memory while they stream to the card."""

    PINNED = "pinned"
    """A page-locked copy in RAM (`t2v.pinning`): the card copies at full speed, beside the compute.
    Needs the component's size in host memory."""
    MAPPED = "mapped"
    """No copy: the weights stay in the memory-mapped safetensors files that `from_pretrained` opened
    (the page cache, which the kernel can drop and read again), and each group is staged through a
    page-locked buffer as it streams (diffusers' `low_cpu_mem_usage` group offloading). For a host
    without room for the component; slower, since every onload copies its group on the CPU first."""


HOST_RESERVE = int(1.5 * 2**30)
"""Host memory a stage needs beside its component's weights: its inputs and outputs (latents, a clip's
frames), the page-locked staging of streamed groups, the allocator's slack."""


def host_placement(component_bytes: int, free_bytes: int) -> HostPlacement:
    """PINNED if the component fits in the host memory free for it (with `HOST_RESERVE` beside it),
    else MAPPED."""
    return HostPlacement.PINNED if component_bytes + HOST_RESERVE <= free_bytes else HostPlacement.MAPPED


def host_need(plan: StagePlan) -> int:
    """Host memory `plan` needs beside the process itself: the whole component when pinned; when
    mapped, the reserve and two streamed blocks' page-locked staging (the page cache then holds what
    the kernel can spare of the files, read again from disk as needed)."""
    if plan.host is HostPlacement.PINNED:
        return plan.component_bytes + HOST_RESERVE
    return HOST_RESERVE + 2 * plan.block_bytes


def with_host(plans: Iterable[StagePlan], host: HostPlacement, component_bytes: int) -> list[StagePlan]:
    """`plans` with their weights held on the host as `host` says (a plan without a card: unchanged)."""
    return [
        plan if plan.placement is Placement.CPU else replace(plan, host=host, component_bytes=component_bytes)
        for plan in plans
    ]


def option(default: Any, *, label: Any = None, moves_weights: bool = False) -> Any:
    """A plan option field. `label(value)` gives its part of the plan's name (None: not named), and
    `moves_weights` puts it in the residency key: plans that differ in it cannot share a loaded
    component (its pinned host copies and hooks)."""
    return field(default=default, metadata={"label": label, "moves_weights": moves_weights})


@dataclass(frozen=True)
class PlanOptions:
    """A stage's own switches; a subclass per stage adds `option` fields and the module hooks."""

    def labels(self) -> list[str]:
        parts = []
        for f in fields(self):
            label = f.metadata.get("label")
            part = label(getattr(self, f.name)) if label else None
            if part:
                parts.append(part)
        return parts

    def weights_key(self) -> str:
        return "|".join(
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.metadata.get("moves_weights")
        )

    def prepare(self, module: torch.nn.Module, whole_to: torch.device | None = None) -> torch.nn.Module:
        """Before the weights are placed (wrappers that offloading hooks must see, storage dtypes).
        `whole_to` is the card the whole component goes to (None when it streams or stays on the
        host): a preparation that recasts every weight may move it there first and cast it there."""
        return module

    def offload_target(self, module: torch.nn.Module, placement: Placement) -> torch.nn.Module:
        """The module whose blocks group offloading streams."""
        return module

    def configure(self, module: torch.nn.Module) -> torch.nn.Module:
        """The cheap switches on an already placed component (FFN chunks, VAE tiles)."""
        return module


@dataclass(frozen=True)
class StagePlan:
    """How one stage runs. Serialised as `name` into the run log."""

    stage: str
    placement: Placement
    device: str = "cuda"
    options: PlanOptions = field(default_factory=PlanOptions)
    record_stream: bool = False
    """group offload: let the allocator track prefetched weights per stream instead of synchronising
    before each group is dropped. Faster queueing, but freed blocks wait for the stream and the
    allocator reserves new ones meanwhile: reserved memory climbs to the cap (docs/benchmarks.md)."""
    resident_blocks: int = 0
    """Under group offloading: this many blocks, spread evenly, stay on the card and are never
    streamed; `choose` fills the budget's spare room with them (see `with_resident`)."""
    block_bytes: int = 0
    """Under group offloading: bytes one more resident block costs (0: this plan keeps none)."""
    blocks: int = 0
    """Under group offloading: how many blocks the component has."""
    estimate_bytes: int = 0
    host: HostPlacement = HostPlacement.PINNED
    """Where the weights wait on the host (`with_host` sets it from the host's budget)."""
    component_bytes: int = 0
    """The component's size, for the host's share (`host_need`); 0 until `with_host` sets it."""

    @property
    def name(self) -> str:
        parts = [self.placement.value]
        if self.resident_blocks:
            parts.append(f"r{self.resident_blocks}")
        parts += self.options.labels()
        if self.host is HostPlacement.MAPPED:
            parts.append(self.host.value)  # pinned, the default, is not named: older names stand
        return f"{self.stage}:{'-'.join(parts)}"

    @property
    def residency_key(self) -> str:
        """What decides where a component's weights are: plans with the same key can share a loaded
        component, whatever their cheap switches (CFG batch, FFN chunks, VAE tiles)."""
        return (
            f"{self.stage}|{self.placement.value}|{self.device}|resident={self.resident_blocks}"
            f"|host={self.host.value}|{self.options.weights_key()}"
        )

    @property
    def estimate_gib(self) -> float:
        return self.estimate_bytes / GiB

    def with_options(self, **changes: Any) -> StagePlan:
        return replace(self, options=replace(self.options, **changes))


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
    transformer_element_bytes: int
    """Bytes per weight as loaded: also the adapters', which peft creates in their base layer's dtype."""
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
            transformer_element_bytes=weight_element_bytes(transformer) if transformer else 0,
            vae_params=sum(p.numel() for p in vae.parameters()) if vae else 0,
        )


@functools.lru_cache(maxsize=16)
def component_sizes(model: ModelRef, component: str) -> tuple[ComponentSizes, int]:
    """What the planner needs of `component`, and its bytes, from a weightless copy built from the
    config on the meta device; once per model and process (the CLI's budget check, the flow's and the
    runner's ask the same). A model's identity changes with its configs, so the cache cannot go stale."""
    module = registry.skeleton(model, component)
    return ComponentSizes.from_modules(**{component: module}), module_bytes(module)


def weight_element_bytes(module: torch.nn.Module) -> int:
    """Bytes per element of the dtype most of `module`'s weights are in: the layers', beside the few
    norms and tables diffusers keeps in float32 (`_keep_in_fp32_modules`), which come first in Wan's."""
    counts: collections.Counter[int] = collections.Counter()
    for p in module.parameters():
        counts[p.element_size()] += p.numel()
    return counts.most_common(1)[0][0]


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters (0 for None); works on meta-device skeletons."""
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())


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


COMPILE_PAYS_AFTER_STEPS = 200
"""Measured on an H100 under the 8 GiB plan at 480P (docs/benchmarks.md): compiling the repeated block
cost 15.8 s on the first step and made each step 0.11 s faster (0.49 -> 0.39 s): it pays back after
~150 steps, so a run compiles from 200 steps on (four 50-step clips). Compiled kernels round
differently: the latents moved 3.3% after 3 steps on random weights, as other kernel choices do."""

COMPILE_PAYS_AFTER_WARM_STEPS = 40
"""The same from Inductor's on-disk cache (a later night at the same shapes, `t2v.compile_cache`):
measured on an H200 at 480P under 8 GiB, the compile cost 2.2-4.4 s and each step got 0.115 s faster
(0.474 -> 0.359 s), so it pays back after 19-38 steps: one 50-step clip."""


COMPILED_STEP_SAVING_S = ((8_190, 0.11), (27_280, 0.32))
"""Seconds a compiled step saves against an eager one, by the step's video tokens: 832x480x81 (0.108 s
uncapped, 0.115 under 8 GiB) and 1280x704x121 (0.32 s uncapped), on an H200 (docs/benchmarks.md). The
step counts above are 480P steps; a larger clip's step saves more, and counts for more."""


def compile_weight(tokens: int) -> float:
    """How many 480P steps' worth of saving one step of `tokens` video tokens brings to a compile:
    linear between the measured sizes (and beyond the larger), and 1 at or below 480P, where the step
    counts stay as they were measured."""
    (small, saved_small), (large, saved_large) = COMPILED_STEP_SAVING_S
    if tokens <= small:
        return 1.0
    saved = saved_small + (saved_large - saved_small) * (tokens - small) / (large - small)
    return saved / saved_small


def compile_pays(steps: Iterable[float], mode: str = "auto", *, warm: bool = False) -> bool:
    """Whether to `torch.compile` the transformer's blocks for a run with these jobs' step counts (in
    480P steps: `compile_weight`); `warm` where Inductor's cache holds the run's shapes compiled already
    (`t2v.compile_cache`).

    `mode` is `auto`, `on` or `off` (T2V_COMPILE, checked by `Settings.from_env`)."""
    if mode not in COMPILE_MODES:
        raise InvalidInput(f"`T2V_COMPILE` has to be auto, on or off but is {mode!r}.")
    if mode != "auto":
        return mode == "on"
    return sum(steps) >= (COMPILE_PAYS_AFTER_WARM_STEPS if warm else COMPILE_PAYS_AFTER_STEPS)
