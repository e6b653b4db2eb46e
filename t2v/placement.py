"""Putting a plan in place: a loaded (CPU) component moved to the card whole, or streamed block by
block with diffusers' group offloading, with some blocks kept resident. What differs per stage is in the
plan's options (`PlanOptions.prepare`, `.offload_target`, `.configure`), not here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from t2v.plans import HostPlacement, Placement, StagePlan


def apply(
    plan: StagePlan, module: torch.nn.Module, *, pin: Callable[[torch.nn.Module], None] | None = None
) -> torch.nn.Module:
    """Place a freshly loaded (CPU) component as the plan says, then `configure` it; returns it.

    `pin(module)` page-locks the host copy of a component that streams with its weights pinned
    (`HostPlacement.PINNED`), after the plan's preparation (which may recast them) and before the
    offloading hooks, which would otherwise page-lock each tensor with a copy of its own."""
    device = torch.device(plan.device)
    # Wrapped before the hooks go on, so that leaf-level offloading sees the final module tree.
    module = plan.options.prepare(module, device if plan.placement is Placement.GPU else None)
    if plan.placement in (Placement.GPU, Placement.CPU):
        return configure(plan, module.to(device))
    from diffusers.hooks import apply_group_offloading

    leaf = plan.placement is Placement.LEAF
    mapped = plan.host is HostPlacement.MAPPED
    target = plan.options.offload_target(module, plan.placement)
    with _resident_blocks_hidden(target, plan.resident_blocks) as resident:
        if pin is not None and not leaf and not mapped:
            pin(target)
        apply_group_offloading(
            target,
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level" if leaf else "block_level",
            num_blocks_per_group=None if leaf else 1,
            use_stream=not leaf,
            non_blocking=not leaf,
            record_stream=plan.record_stream and not leaf,
            # Mapped: the weights stay where `from_pretrained` mapped them, each group copied into
            # page-locked staging as it streams, instead of a page-locked copy of every tensor.
            low_cpu_mem_usage=mapped,
        )
    for block in resident:
        block.to(device)
    if not leaf:
        _keep_unmatched_on_card(target, device)
    return configure(plan, module)


def configure(plan: StagePlan, module: torch.nn.Module) -> torch.nn.Module:
    """The plan's cheap switches on an already placed component: FFN chunks, VAE tiles."""
    return plan.options.configure(module)


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


LAZY_PREFETCH = "lazy_prefetch_group_offloading"
"""diffusers' registry name for the hook that learns the streamed blocks' order in the first forward
of a module group-offloaded with CUDA streams, then removes its trackers."""


def compile_blocks(module: torch.nn.Module, **kwargs: object) -> None:
    """`compile_repeated_blocks(dynamic=False)` on `module` (the runner's compile), deferred to the end
    of its first forward where group offloading still has to learn the blocks' order.

    In that first forward diffusers hangs a tracker hook on every streamed block, each with the block's
    name in its closure, and dynamo guards on that name. Compiled then, each streamed block
    recompiles, past dynamo's limit of 8 the rest run eager, and once the trackers are gone they all
    compile again. Measured at 480P under 6 GiB, the first two steps took 3.4 and 1.4 s against
    0.37 s compiled (docs/benchmarks.md). Deferred, the first forward runs eager and the blocks compile
    once."""
    from diffusers.hooks import HookRegistry

    options = {"dynamic": False, **kwargs}
    if HookRegistry.check_if_exists_or_initialize(module).get_hook(LAZY_PREFETCH) is None:
        module.compile_repeated_blocks(**options)
        return

    def after_first_forward(target: torch.nn.Module, args: object, output: object) -> None:
        handle.remove()
        target.compile_repeated_blocks(**options)

    handle = module.register_forward_hook(after_first_forward)


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
