"""The model's stages as plain functions of tensors: encode, denoise, decode.

They follow `diffusers.WanPipeline.__call__` step by step, so that encode -> denoise -> decode on the
same seed gives the pipeline's own latents and frames (tests/test_stages.py holds them to that); with a
conditioning picture (`encode_first_frame`, `denoise(condition=...)`) they follow
`WanImageToVideoPipeline.__call__` with `expand_timesteps=True` (tests/test_image.py). Three departures
are switches on the memory plan, each measured against the plain path: `shared_timestep` (one timestep
per sample, not one per token, in pure text-to-video), `frame_timesteps` (the per-token timesteps of an
image job embedded once per distinct value: `t2v.frame_timesteps`) and `cfg_batch` (conditional and
unconditional passes as one batch of 2).
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

from t2v import frame_timesteps as per_frame
from t2v.checkpoints import Checkpoint, restore_scheduler
from t2v.errors import NonFiniteOutput

if TYPE_CHECKING:
    from PIL import Image

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
def encode_first_frame(
    vae: torch.nn.Module, picture: Image.Image, *, device: torch.device | str
) -> torch.Tensor:
    """The latent of a clip's first frame, `picture` (already the clip's size), as
    `WanImageToVideoPipeline.prepare_latents` makes it with `expand_timesteps=True`: pixels in [-1, 1]
    through the VAE's encoder, the mode of its distribution ("argmax"), normalised with the VAE's
    `latents_mean` and `latents_std`. (1, channels, 1, height / 16, width / 16), fp32."""
    from diffusers import WanImageToVideoPipeline

    # The pipeline's own preprocessing and prepare_latents: one way to do it.
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=None, expand_timesteps=True
    )
    width, height = picture.size
    device = torch.device(device)
    pixels = pipe.video_processor.preprocess(picture, height=height, width=width).to(device, torch.float32)
    # prepare_latents also hands back the noise it is given and the mask: only the picture's latent is
    # kept here (the seed's noise is the diffuse stage's, drawn there as for a text-only job).
    given = torch.zeros(1, device=device)
    _, latent, _ = pipe.prepare_latents(
        pixels, 1, vae.config.z_dim, height, width, 1, torch.float32, device, None, given
    )
    return latent


def first_frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """0 on the first latent frame (the picture's), 1 on the frames being denoised: the mask
    `WanImageToVideoPipeline.prepare_latents` returns with `expand_timesteps=True`. (1, 1, F, h, w)."""
    _, _, frames, height, width = latents.shape
    mask = torch.ones(1, 1, frames, height, width, dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 0
    return mask


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
    condition: torch.Tensor | None = None,
    frame_timesteps: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    resume: Checkpoint | None = None,
    after_step: Callable[[int, torch.Tensor, Any], None] | None = None,
) -> torch.Tensor:
    """Run the scheduler's steps from `latents`; `uncond` None (or guidance <= 1) means no guidance.

    With `condition` (an image job: `encode_first_frame`'s latent), the first latent frame is the
    picture's at timestep 0, the others are denoised at t: blended in through `first_frame_mask` before
    every step and written back at the end, as `WanImageToVideoPipeline.__call__` does with
    `expand_timesteps=True`. Its timestep is then per token (`shared_timestep` is refused), or with
    `frame_timesteps` one per latent frame (the transformer needs `t2v.frame_timesteps.install`).

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
    mask = None
    if condition is not None:
        if shared_timestep:
            raise ValueError("`shared_timestep` is for text-only jobs: an image job's timestep is per token")
        mask = first_frame_mask(latents)
        condition = condition.to(device, latents.dtype)
    if frame_timesteps and not shared_timestep and not per_frame.installed(transformer):
        raise ValueError("`frame_timesteps` needs the transformer's hooks: t2v.frame_timesteps.install")
    timesteps = _Timesteps(transformer, latents, mask, shared=shared_timestep, per_frame=frame_timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        x = latents if mask is None else (1 - mask) * condition + mask * latents
        x = x.to(compute_dtype)
        timestep = timesteps.at(t.to(torch.float32))
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
    if mask is not None:
        latents = (1 - mask) * condition + mask * latents
    return latents


class _Timesteps:
    """The transformer's `timestep` at each step: one per sample (`shared`), one per latent frame
    (`per_frame`), or one per token as the pipelines build it; with a first-frame mask, 0 on the
    picture's frame."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        shared: bool,
        per_frame: bool,
    ) -> None:
        p_t, p_h, p_w = transformer.config.patch_size
        self.shared, self.per_frame = shared, per_frame
        # Per-token timesteps (what expand_timesteps=True builds) hold one value in text-to-video; the
        # transformer then projects it once per token (~2 GB fp32 per sample at 720P) for nothing.
        self.tokens = latents[0, 0, ::p_t, ::p_h, ::p_w].numel()
        self.frames = latents[0, 0, ::p_t, 0, 0].numel()
        self.token_weights = None if mask is None else mask[0, 0, ::p_t, ::p_h, ::p_w].flatten()
        self.frame_weights = None if mask is None else mask[0, 0, ::p_t, 0, 0]

    def at(self, t: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return t.reshape(1)
        weights, count = (
            (self.frame_weights, self.frames) if self.per_frame else (self.token_weights, self.tokens)
        )
        return t.expand(1, count) if weights is None else (weights * t).unsqueeze(0)


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
    processor = VideoProcessor(vae_scale_factor=config.scale_factor_spatial)
    return frames_uint8(video, processor, device=latents.device)


FRAMES_AT_ONCE = 16
"""Frames converted to uint8 at a time on the decoder's device: ~0.3 GB of temporaries at 720P."""


def frames_uint8(
    video: torch.Tensor, processor: VideoProcessor, *, device: torch.device | str | None = None
) -> np.ndarray:
    """The decoded (1, 3, F, H, W) video as uint8 (F, H, W, 3) frames, bit-identical to diffusers'
    `postprocess_video(output_type="np")` then `to_uint8`.

    Converted on `device` (default: the video's; a video blended on the host goes to the card for
    this), a few frames at a time: diffusers' "np" output makes a float32 copy on the host (1.3 GB at
    720P) that numpy then rounds on one core, 2.7 s per 720P clip on the H200's host; the same float32
    operations on the card took 0.27 s (docs/benchmarks.md)."""
    _, _, count, height, width = video.shape
    frames = torch.empty((count, height, width, 3), dtype=torch.uint8)
    for start in range(0, count, FRAMES_AT_ONCE):
        part = video[:, :, start : start + FRAMES_AT_ONCE].to(device or video.device)
        if not torch.isfinite(part).all():
            # Clipped to [0, 1] below, NaN would become black frames that look like a clip.
            raise NonFiniteOutput(
                "the decoded frames hold NaN or infinite values; nothing is stored or published"
            )
        unit = processor.postprocess_video(part, output_type="pt")[0]  # (f, 3, H, W) in [0, 1]
        rounded = unit.float().mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        frames[start : start + part.shape[2]].copy_(rounded.permute(0, 2, 3, 1))
    return frames.numpy()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
