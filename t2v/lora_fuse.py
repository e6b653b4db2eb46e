"""LoRA adapters folded into their layer's weight for each forward, on the card, instead of peft's
unmerged `base(x) + B(A(x)) * scale`.

Why: unmerged, each adapted layer adds four passes over the activations (A's product, B's product,
the scaling, the sum): at 480P with CFG batched that is 16k tokens x 3072 channels per pass, ~300
layers a step, memory-bound, 17% of a step on an H200 (docs/benchmarks.md). Folded, the layer runs
one product with `W + scale * B @ A`, which one `addmm` makes from the weights alone (9.4M elements
for a 3072-wide layer, whatever the sequence length), with one rounding to the weight's dtype (and
one of B times its scale).

Why not peft's `merge_adapter`/diffusers' `fuse_lora`: they write the sum into the base weight, and
unmerging it in bf16 does not give the original weight back, so a night switching LoRAs per job would
leak one template's style into the next; under group offloading the weights that move are the host's
copies, which merging would change for good. Here nothing is written: the folded weight lives for one
call. Same math as unmerged, other rounding: tests/test_lora.py bounds the deviation on the CPU, and
bench/lora_fold.py measures it and the speed on a card.

A layer whose weight is not where its input is, or in another dtype, runs peft's own forward: leaf
offloading onloads a weight in its base layer's forward, fp8 storage casts it there.

Why a subclass and not a diffusers hook (`ModelHook`): a hook's registry sets each layer's `forward`
to a partial of its own, and torch.compile guards on that object's identity, so each of the 30
blocks that `compile_repeated_blocks` means to share one compiled graph recompiled, and past
dynamo's limit of 8 the rest ran eager (a LoRA night at 480P: 2.0 steps/s against 2.75 compiled
without LoRA, docs/benchmarks.md). The folded forward is a method of the layer's class instead, a
subclass of peft's made once per class (`install` swaps it in): every block's layers have the same
class and the same code, so one graph serves them all.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear


class FoldedForward:
    """Mixed into a peft LoRA Linear: a call with only the input runs `linear(x, W + sum(s * B @ A))`
    over the job's adapters (`set_job`) while `t2v_fold`; anything else (off, adapters disabled or
    merged, no job set, a DoRA or other variant, an adapter with a bias, an adapter dropout in
    training mode, extra arguments) runs peft's own forward."""

    t2v_fold: bool = True
    t2v_scales: torch.Tensor | None = None
    """The job's scales in its order (`set_job`): one tensor that all folding layers share."""
    t2v_active: tuple[tuple[torch.Tensor, torch.Tensor, int], ...] = ()
    """The job's adapters in this layer, in the job's order: (B's weight, A's weight, the scale's index)."""
    t2v_foldable: bool = False
    t2v_dropout_free: bool = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = folded_weight(self, x) if self.t2v_fold and not args and not kwargs else None
        if weight is None:
            return super().forward(x, *args, **kwargs)
        return torch.nn.functional.linear(x, weight, self.get_base_layer().bias)


_FOLDED: dict[type, type] = {}
"""peft's layer class -> its folding subclass, made once: one class per layer type, so one graph."""


def _folded_class(cls: type) -> type:
    if cls not in _FOLDED:
        _FOLDED[cls] = type(f"Folded{cls.__name__}", (FoldedForward, cls), {"__module__": __name__})
    return _FOLDED[cls]


def folded_weight(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The base weight plus each of the job's adapters' `scale * B @ A`, or None where peft's forward
    must run.

    The adapters are read from `t2v_active` (tensors) and their scales from `t2v_scales` (a tensor),
    not by name from peft's `active_adapters` and `scaling`: torch.compile's graph then holds no
    adapter name or scale as a constant, and a night's jobs switch styles without a recompile
    (one per count of adapters a job has)."""
    scales = module.t2v_scales
    if module.disable_adapters or module.merged or not module.t2v_foldable or scales is None:
        return None
    if module.training and not module.t2v_dropout_free:
        return None  # a dropout that acts on the adapter's input alone
    weight = module.get_base_layer().weight
    if weight.device != x.device or weight.dtype != x.dtype or scales.device != x.device:
        return None
    for up, down, _ in module.t2v_active:
        if down.device != weight.device or down.dtype != weight.dtype or up.dtype != weight.dtype:
            return None
    # fp32 accumulation inside each product, one rounding per adapter; the scale goes into B (its
    # rounding to bf16 the only one beyond unmerged peft's math).
    for up, down, index in module.t2v_active:
        weight = torch.addmm(weight, up * scales[index], down)
    return weight


def install(module: torch.nn.Module) -> int:
    """Give every peft LoRA Linear of `module` the folded forward (once); how many layers have it."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, LoraLinear):
            if not isinstance(layer, FoldedForward):
                layer.__class__ = _folded_class(type(layer))
            count += 1
    return count


def set_job(module: torch.nn.Module, scales: dict[str, float], device: torch.device | str) -> None:
    """Point every folding layer of `module` at the job's adapters (`scales`: name -> scale, in the
    job's order; the scales in one tensor on `device`, where the layers compute). The tensor is
    written in place where the job has as many adapters as the last, and torch.compile's graphs take
    it and the adapters' weights as inputs: a switch of styles or scales needs no recompile."""
    layers = [layer for layer in module.modules() if isinstance(layer, FoldedForward)]
    if not layers:
        return
    values = torch.tensor([float(v) for v in scales.values()], dtype=torch.float32).to(device)
    shared = layers[0].t2v_scales
    if shared is None or shared.shape != values.shape or shared.device != values.device:
        shared = values  # ("cuda" and "cuda:0" compare by the tensor's device)
    else:
        shared.copy_(values)
    for layer in layers:
        names = [(i, name) for i, name in enumerate(scales) if name in layer.lora_A]
        layer.t2v_scales = shared
        layer.t2v_active = tuple((layer.lora_B[n].weight, layer.lora_A[n].weight, i) for i, n in names)
        layer.t2v_foldable = not layer.fan_in_fan_out and all(
            n not in layer.lora_variant and layer.lora_B[n].bias is None for _, n in names
        )
        layer.t2v_dropout_free = all(isinstance(layer.lora_dropout[n], torch.nn.Identity) for _, n in names)


def set_folding(module: torch.nn.Module, on: bool) -> None:
    """Fold (True) or run peft's unmerged forward (False) in every layer `install` gave it to."""
    for layer in module.modules():
        if isinstance(layer, FoldedForward):
            layer.t2v_fold = on
