"""LoRA adapters folded into their layer's weight for each forward, on the card, instead of peft's
unmerged `base(x) + B(A(x)) * scale`.

Why: unmerged, each adapted layer adds four passes over the activations (A's product, B's product,
the scaling, the sum): at 480P with CFG batched that is 16k tokens x 3072 channels per pass, ~300
layers a step, memory-bound, 17% of a step on an H200 (docs/benchmarks.md). Folded, the layer runs
one product with `W + scale * B @ A`, which one `addmm` makes from the weights alone (9.4M elements
for a 3072-wide layer, whatever the sequence length), with one rounding to the weight's dtype.

Why not peft's `merge_adapter`/diffusers' `fuse_lora`: they write the sum into the base weight, and
unmerging it in bf16 does not give the original weight back, so a night switching LoRAs per job would
leak one template's style into the next; under group offloading the weights that move are the host's
copies, which merging would change for good. Here nothing is written: the folded weight lives for one
call. Same math as unmerged, other rounding: tests/test_lora.py bounds the deviation on the CPU, and
bench/lora_fold.py measures it and the speed on a card.

A layer whose weight is not where its input is, or in another dtype, runs peft's own forward: leaf
offloading onloads a weight in its base layer's forward, fp8 storage casts it there.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from peft.tuners.lora import Linear as LoraLinear

HOOK = "t2v_lora_fuse"


class FoldedForward(ModelHook):
    """On one peft LoRA Linear: a call with only the input runs `linear(x, W + sum(s * B @ A))` while
    `on`; anything else (off, adapters disabled or merged, no active one, a DoRA or other variant, an
    adapter with a bias, an adapter dropout in training mode, extra arguments) runs the layer's own
    forward."""

    def __init__(self) -> None:
        super().__init__()
        self.on = True

    def new_forward(self, module: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = folded_weight(module, x) if self.on and not args and not kwargs else None
        if weight is None:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        return torch.nn.functional.linear(x, weight, module.get_base_layer().bias)


def folded_weight(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The base weight plus each active adapter's `scale * B @ A`, or None where peft's forward must run."""
    if module.disable_adapters or module.merged or module.fan_in_fan_out:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active or any(name in module.lora_variant for name in active):
        return None
    if module.training and not all(isinstance(module.lora_dropout[n], torch.nn.Identity) for n in active):
        return None  # a dropout that acts on the adapter's input alone
    weight = module.get_base_layer().weight
    if weight.device != x.device or weight.dtype != x.dtype:
        return None
    for name in active:
        down, up = module.lora_A[name].weight, module.lora_B[name].weight
        if down.device != weight.device or down.dtype != weight.dtype or up.dtype != weight.dtype:
            return None
        if module.lora_B[name].bias is not None:  # peft's `lora_bias`: a term the fold leaves out
            return None
    for name in active:  # fp32 accumulation inside the product, one rounding per adapter
        up, down = module.lora_B[name].weight, module.lora_A[name].weight
        weight = torch.addmm(weight, up, down, alpha=module.scaling[name])
    return weight


def install(module: torch.nn.Module) -> int:
    """Give every peft LoRA Linear of `module` the folded forward (once); how many layers have it."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, LoraLinear):
            registry = HookRegistry.check_if_exists_or_initialize(layer)
            if registry.get_hook(HOOK) is None:
                registry.register_hook(FoldedForward(), HOOK)
            count += 1
    return count


def set_folding(module: torch.nn.Module, on: bool) -> None:
    """Fold (True) or run peft's unmerged forward (False) in every layer `install` hooked."""
    for layer in module.modules():
        if isinstance(layer, LoraLinear):
            hook = HookRegistry.check_if_exists_or_initialize(layer).get_hook(HOOK)
            if hook is not None:
                hook.on = on
