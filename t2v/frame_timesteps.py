"""One timestep per latent frame in WanTransformer3DModel: the two-value switch of image jobs.

With a conditioning frame the timestep is per token (`WanImageToVideoPipeline` with
`expand_timesteps=True`: 0 on the first latent frame's tokens, t on the others), and the transformer
embeds and projects it once per token: `(batch, tokens, 6, dim)` in the weights' dtype, which every
block adds to its own table in fp32 again (about 5 GB per sample at 1280x704x121 in bf16), and
`(batch, tokens, 2, dim)` fp32 in the output head. Only two values occur, so here the embedding is
computed for the distinct values and each frame's modulation is broadcast over that frame's tokens.

diffusers 0.42 has no such path (its Wan block takes one modulation per sample or per token, and
SkyReels-V2's per-frame timesteps are repeated per token too), so two forwards are written here on the
modules' own layers, as diffusers hooks (`ModelHook.new_forward`): the transformer's and each block's.
They are installed before offloading hooks (`install`, from the diffuse plan's `prepare`), so group and
leaf offloading onload the weights first, and stay inert unless `timestep` has one value per latent
frame, `(batch, frames)`; with one token per frame that is the per-token layout and the stock forward
runs. The result matches the per-token path to fp32 rounding (tests/test_image.py).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale

_HOOK = "t2v_frame_timesteps"


def install(transformer: torch.nn.Module) -> torch.nn.Module:
    """Let `transformer` take one timestep per latent frame; once, before any offloading hook."""
    if installed(transformer):
        return transformer
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_PerFrameTransformer(), _HOOK)
    for block in transformer.blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_PerFrameBlock(), _HOOK)
    return transformer


def installed(transformer: torch.nn.Module) -> bool:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(_HOOK) is not None


def _frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, tokens, dim) viewed as (batch, frames, tokens per frame, dim): the tokens are frame-major."""
    return x.unflatten(1, (frames, -1))


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` with one (scale, shift) per frame, each (batch, frames, 1, dim)."""
    return (_frames(x, scale.shape[1]) * (1 + scale) + shift).flatten(1, 2)


def _gated(x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x + update * gate` with one gate per frame."""
    frames = gate.shape[1]
    return (_frames(x, frames) + _frames(update, frames) * gate).flatten(1, 2)


class _PerFrameBlock(ModelHook):
    """WanTransformerBlock.forward's arithmetic with `temb` (batch, frames, 6, dim) instead of per token."""

    def new_forward(self, block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if temb.ndim != 4 or temb.shape[1] == hidden_states.shape[1]:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        # (batch, frames, 1, dim) each, as the stock block's chunks are per token.
        table = block.scale_shift_table.unsqueeze(0) + temb.float()
        shift, scale, gate, c_shift, c_scale, c_gate = table.unsqueeze(2).unbind(3)
        x = hidden_states
        normed = _modulate(block.norm1(x.float()), scale, shift).type_as(x)
        x = _gated(x.float(), block.attn1(normed, None, None, rotary_emb), gate).type_as(x)
        normed = block.norm2(x.float()).type_as(x)
        x = x + block.attn2(normed, encoder_hidden_states, None, None)
        normed = _modulate(block.norm3(x.float()), c_scale, c_shift).type_as(x)
        return _gated(x.float(), block.ffn(normed).float(), c_gate).type_as(x)


class _PerFrameTransformer(ModelHook):
    """WanTransformer3DModel.forward with `timestep` (batch, latent frames): embedded once per distinct
    value, one modulation per frame passed to the blocks and the output head."""

    def new_forward(self, transformer, hidden_states, timestep, encoder_hidden_states, *args, **kwargs):
        frames = hidden_states.shape[2] // _patch(transformer)[0]
        per_frame = timestep.ndim == 2 and timestep.shape[1] == frames
        # One token per frame: per frame is per token, which the stock forward takes as it is; image
        # embeddings (Wan2.1 I2V, not TI2V) take the stock path too.
        image_embeds = args or kwargs.get("encoder_hidden_states_image") is not None
        if not per_frame or _tokens_per_frame(transformer, hidden_states) == 1 or image_embeds:
            return self.fn_ref.original_forward(
                hidden_states, timestep, encoder_hidden_states, *args, **kwargs
            )
        return _per_frame_forward(transformer, hidden_states, timestep, encoder_hidden_states, **kwargs)


def _patch(transformer: torch.nn.Module) -> tuple[int, int, int]:
    return tuple(transformer.config.patch_size)


def _tokens_per_frame(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    _, p_h, p_w = _patch(transformer)
    return (hidden_states.shape[3] // p_h) * (hidden_states.shape[4] // p_w)


@apply_lora_scale("attention_kwargs")
def _per_frame_forward(
    transformer: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    encoder_hidden_states_image: torch.Tensor | None = None,
    return_dict: bool = True,
    attention_kwargs: dict | None = None,
):
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = _patch(transformer)
    grid = (frames // p_t, height // p_h, width // p_w)
    rotary_emb = transformer.rope(hidden_states)
    x = transformer.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

    values, which = timestep.unique(return_inverse=True)  # two values: 0 and t
    if encoder_hidden_states_image is not None:
        raise ValueError(
            "per-frame timesteps are for Wan2.2 TI2V, whose transformer takes no image embeddings"
        )
    temb, projection, context, _ = transformer.condition_embedder(values, encoder_hidden_states, None)
    temb = temb[which]  # (batch, frames, dim)
    projection = projection.unflatten(1, (6, -1))[which]  # (batch, frames, 6, dim)
    for block in transformer.blocks:
        x = block(x, context, projection, rotary_emb)

    head = transformer.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)
    shift, scale = head.unsqueeze(2).unbind(3)  # (batch, frames, 1, dim) each
    x = _modulate(transformer.norm_out(x.float()), scale.to(x.device), shift.to(x.device)).type_as(x)
    x = transformer.proj_out(x)
    # Tokens back to latents: (b, f, h, w, pt, ph, pw, c) -> (b, c, f*pt, h*ph, w*pw).
    x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = x.reshape(batch, -1, grid[0] * p_t, grid[1] * p_h, grid[2] * p_w)
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)
