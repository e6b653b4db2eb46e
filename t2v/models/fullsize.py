"""The full-size Wan2.2 TI2V-5B architecture with random weights, for benchmarks (nothing is downloaded).

Compute and memory are those of the real model; only the numbers in the weights differ. Built on the
GPU with the libraries' own initialisers (seconds, where the CPU takes minutes), cast the way
`from_pretrained(torch_dtype=bf16)` casts (modules listed in `_keep_in_fp32_modules` stay fp32), then
kept on the CPU as a master copy that `clone` shares without copying.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from t2v.models.seeding import seeded
from t2v.models.wan22 import FULL_SIZE


def construct(component: str):
    """The component with the libraries' own initialisers, on the current default device."""
    spec = FULL_SIZE[component]
    if component == "transformer":
        return WanTransformer3DModel(**spec["kwargs"])
    if component == "vae":
        return AutoencoderKLWan(**spec["kwargs"])
    if component == "text_encoder":
        return UMT5EncoderModel(UMT5Config(**spec["config"]))
    raise ValueError(f"`component` must be transformer, vae or text_encoder but is {component!r}")


def cast_like_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters to `dtype`, except those under a module the class keeps in fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if param.is_floating_point() and not any(k in name.split(".") for k in keep):
            param.data = param.data.to(dtype)
    return model


def build(
    component: str,
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    keep_on: str = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """One full-size component with random weights, `dtype` storage, moved to `keep_on`."""
    with seeded(seed), torch.device(device):
        model = construct(component)
    model = model.eval().requires_grad_(False)
    if dtype != torch.float32:
        cast_like_pretrained(model, dtype)
    return model.to(keep_on)


def clone(master: torch.nn.Module) -> torch.nn.Module:
    """A new module object whose tensors are the master's (no copy): hooks and `.to()` on the clone
    replace the clone's tensors and leave the master as it was, so every benchmark case starts equal."""
    with torch.device("meta"):
        if isinstance(master, UMT5EncoderModel):
            fresh = UMT5EncoderModel(master.config)
        else:
            fresh = type(master).from_config(master.config)
    fresh.load_state_dict(master.state_dict(), assign=True)
    # Buffers outside the state dict (rotary tables) were built on meta: take the master's.
    for name, buf in master.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = fresh.get_submodule(owner_name) if owner_name else fresh
        owner._buffers[attr] = buf
    if isinstance(fresh, UMT5EncoderModel):
        fresh.encoder.embed_tokens = fresh.shared  # tied as from_pretrained ties them
    return fresh.eval().requires_grad_(False)
