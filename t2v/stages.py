"""The model's stages as plain functions of tensors: encode, denoise, decode.

They follow `diffusers.WanPipeline.__call__` step by step, so that encode -> denoise -> decode on the
same seed gives the pipeline's own latents and frames (tests/test_stages.py holds them to that). Two
departures are switches on the memory plan, each measured against the plain path:
`shared_timestep` (one timestep per sample, not one per token, in pure text-to-video) and `cfg_batch`
(conditional and unconditional passes as one batch of 2).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import WanPipeline
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from t2v.checkpoints import Checkpoint, restore_scheduler
from t2v.errors import NonFiniteOutput

if TYPE_CHECKING:
    from t2v.jobs import JobSpec


@torch.no_grad()
def encode_texts(
    text_encoder: torch.nn.Module,
    tokenizer,
    texts: list[str],
    *,
    device: torch.device | str,
    max_sequence_length: int,
) -> torch.Tensor:
    """UMT5 embeddings of `texts`, padded with zeros to `max_sequence_length` exactly as the pipeline does."""
    # The pipeline's own encode_prompt (cleaning, tokenising, masking, zero padding): one way to do it.
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)
    embeds, _ = pipe.encode_prompt(
        prompt=list(texts),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=torch.device(device),
    )
    return embeds


def latent_shape(
    channels: int, *, temporal: int, spatial: int, height: int, width: int, frames: int
) -> tuple[int, ...]:
    """Shape of one clip's latents, as WanPipeline.prepare_latents computes it."""
    return (1, channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def initial_noise(shape: tuple[int, ...], *, seed: int, device: torch.device | str) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same clip on any card (and on no card).
    generator = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


def job_noise(
    job: JobSpec, channels: int, *, temporal: int, spatial: int, device: torch.device | str
) -> torch.Tensor:
    """A job's starting latents: its seed's noise, in the shape the pipeline gives its size."""
    shape = latent_shape(
        channels, temporal=temporal, spatial=spatial, height=job.height, width=job.width, frames=job.frames
    )
    return initial_noise(shape, seed=job.seed, device=device)


@torch.no_grad()
def denoise(
    transformer: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    steps: int,
    guidance: float,
    compute_dtype: torch.dtype,
    shared_timestep: bool = True,
    cfg_batch: int = 2,
    on_step: Callable[[int, int], None] | None = None,
    resume: Checkpoint | None = None,
    after_step: Callable[[int, torch.Tensor, Any], None] | None = None,
) -> torch.Tensor:
    """Run the scheduler's steps from `latents`; `uncond` None (or guidance <= 1) means no guidance.

    With `resume`, the steps it holds are not run again: its latents and scheduler state replace
    `latents` and the fresh state, and the loop starts at its step. `after_step(done, latents,
    scheduler)` is called after each step (to save a checkpoint)."""
    device = latents.device
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)
    start = 0
    if resume is not None:
        restore_scheduler(scheduler, resume.scheduler, device)
        latents, start = resume.latents.to(device, latents.dtype), resume.step
    use_cfg = guidance > 1.0 and uncond is not None
    cond = cond.to(device, compute_dtype)
    if use_cfg:
        uncond = uncond.to(device, compute_dtype)
        both = torch.cat([cond, uncond]) if cfg_batch == 2 else None
    # Per-token timesteps (what expand_timesteps=True builds) hold one value in text-to-video; the
    # transformer then projects it once per token (~2 GB fp32 per sample at 720P) for nothing.
    tokens = latents[0, 0, :, ::2, ::2].numel()
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        x = latents.to(compute_dtype)
        t_value = t.to(torch.float32)
        if shared_timestep:
            timestep = t_value.reshape(1)
        else:
            timestep = t_value.expand(1, tokens)
        if use_cfg and cfg_batch == 2:
            out = _forward(
                transformer,
                "cfg-batch",
                hidden_states=torch.cat([x, x]),
                timestep=timestep.expand(2, *timestep.shape[1:]),
                encoder_hidden_states=both,
            )
            noise_cond, noise_uncond = out.chunk(2)
        else:
            noise_cond = _forward(
                transformer, "cond", hidden_states=x, timestep=timestep, encoder_hidden_states=cond
            )
            noise_uncond = None
            if use_cfg:
                noise_uncond = _forward(
                    transformer, "uncond", hidden_states=x, timestep=timestep, encoder_hidden_states=uncond
                )
        if noise_uncond is not None:
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        else:
            noise = noise_cond
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, steps)
        if after_step is not None:
            after_step(i + 1, latents, scheduler)
    return latents


def _forward(transformer: torch.nn.Module, context: str, **inputs: torch.Tensor) -> torch.Tensor:
    # A step cache keeps its state per named context, as WanPipeline names its "cond" and "uncond" passes.
    cached = getattr(transformer, "is_cache_enabled", False)
    with transformer.cache_context(context) if cached else nullcontext():
        return transformer(**inputs, return_dict=False)[0]


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, device: torch.device | str) -> np.ndarray:
    """Frames as uint8 (F, H, W, 3) RGB, un-normalising the latents as WanPipeline does."""
    config = vae.config
    latents = latents.to(torch.device(device), dtype=vae.dtype)
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    video = vae.decode(latents / std + mean, return_dict=False)[0]
    if not torch.isfinite(video).all():
        # Clipped to [0, 1] below, NaN would become black frames that look like a clip.
        raise NonFiniteOutput(
            "the decoded frames hold NaN or infinite values; nothing is stored or published"
        )
    frames = VideoProcessor(vae_scale_factor=config.scale_factor_spatial).postprocess_video(
        video, output_type="np"
    )
    return to_uint8(frames[0])


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
