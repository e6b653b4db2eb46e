"""Stock diffusers' WanPipeline for bench/gpu_memory.py: everything on the card, model offload, or group
offload as diffusers' docs show it, timed with the same clock as ours."""

from __future__ import annotations

import time

import torch

from bench.clock import Clock, free_cuda, step_timer
from t2v import stages
from t2v.jobs import JobSpec
from t2v.models import fullsize, tiny
from t2v.pipeline import decode, encode

PROMPT = "A corgi in a red scarf runs through fresh snow at golden hour, slow motion, shallow depth of field"
NEGATIVE = "blurry, low quality, static"


def place(case: str, pipe, device: str) -> None:
    """The case's placement, with diffusers' own switches."""
    from diffusers.hooks import apply_group_offloading

    if case == "stock-gpu":
        pipe.to(device)
    elif case == "stock-model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif case == "stock-group-offload":
        onload = torch.device(device)
        pipe.transformer.enable_group_offload(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=True,
        )
        apply_group_offloading(
            pipe.text_encoder, onload_device=onload, offload_type="leaf_level", use_stream=True
        )
        pipe.vae.to(device)
        pipe.vae.enable_tiling()


def run_stock(case: str, masters: dict, tokenizer, job: JobSpec, device: str, steps: int) -> dict:
    from diffusers import WanPipeline

    te, tr, vae = (fullsize.clone(masters[k]) for k in ("text_encoder", "transformer", "vae"))
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=te,
        transformer=tr,
        vae=vae,
        scheduler=tiny.build_scheduler(),
        expand_timesteps=True,
    )
    clock = Clock(device)
    setup_start = time.perf_counter()
    place(case, pipe, device)
    clock.sync()
    setup_s = time.perf_counter() - setup_start
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()

    (pe, ne), encode_s = clock.phase(
        encode.STAGE.name,
        lambda: pipe.encode_prompt(
            PROMPT,
            NEGATIVE,
            do_classifier_free_guidance=True,
            max_sequence_length=512,
            device=torch.device(device),
        ),
    )
    times: list[float] = []
    on_step, last = step_timer(clock, times)

    def callback(pipeline, i, t, kwargs):
        on_step()
        return {}

    def denoise():
        last[0] = time.perf_counter()
        return pipe(
            prompt_embeds=pe,
            negative_prompt_embeds=ne,
            height=job.height,
            width=job.width,
            num_frames=job.frames,
            num_inference_steps=steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="latent",
            callback_on_step_end=callback,
        ).frames

    latents, _ = clock.phase("denoise", denoise)
    frames, decode_s = clock.phase(
        decode.STAGE.name, lambda: stages.decode_latents(pipe.vae, latents, device=device)
    )
    result = dict(
        setup_s=setup_s,
        encode_s=encode_s,
        step_times=times,
        decode_s=decode_s,
        peaks=clock.phase_peaks,
        plans=None,
    )
    pipe = te = tr = vae = None  # drop the last references before the next case  # noqa: F841
    free_cuda()
    return result, latents.float().cpu(), frames
