"""Image-to-video on one card: stock `WanImageToVideoPipeline` beside t2v's plans, one process.

Full-size random weights (t2v.models.fullsize), a synthetic 1024x768 picture fitted to each size as the
library fits it (cover, centre-crop), the same seed for every case:
  stock-gpu        WanImageToVideoPipeline(expand_timesteps=True), everything on the card
  ours             t2v's planner with the card's free memory as budget
  ours-cap8/-cap6  under an 8 / 6 GiB cap (`set_per_process_memory_fraction`)
  ours-cap6-token  under 6 GiB with the two-value timestep switch off (`frame_timesteps=False`):
                   the per-token (batch, tokens, 6, dim) projection the switch avoids
Each case: encode (prompt + negative), the first frame through the VAE's encoder (ours: its own
phase, as the diffuse stage does it before placing the transformer; stock: inside its call),
`--steps` steps with CFG 5.0, decode. Records as bench/gpu_memory.py's, in image_to_video.json.

    python bench/image_to_video.py --out bench/results                  # on a GPU (the device tool)
    python bench/image_to_video.py --encode-only --out /tmp/bench       # the first-frame encode's peak
    python bench/image_to_video.py --tiny --out /tmp/bench              # CPU smoke run, tiny model
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.clock import Clock, GiB, free_cuda, step_timer  # noqa: E402
from bench.gpu_memory import bench_job, build_masters, case_cap, compare, make_record  # noqa: E402
from bench.gpu_memory import run_on_plans as on_plans  # noqa: E402
from bench.gpu_stock import NEGATIVE, PROMPT  # noqa: E402
from t2v import images, stages  # noqa: E402
from t2v.models import fullsize, tiny  # noqa: E402
from t2v.pipeline import decode, diffuse, encode  # noqa: E402
from t2v.plans import ComponentSizes  # noqa: E402

CASES = "stock-gpu,ours,ours-cap8,ours-cap6,ours-cap6-token"


def synthetic_picture(width: int = 1024, height: int = 768) -> images.Picture:
    """A seeded picture with gradients and edges, so the encoder sees structure, not a flat field."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * np.hypot(x - 0.5, y - 0.4))], axis=-1)
    from PIL import Image

    return images.Picture(pixels=Image.fromarray((rgb * 255).astype(np.uint8)))


def image_job(res: str, steps: int, folder: Path):
    """gpu_memory's job at `res`, conditioned on the synthetic picture (saved in `folder`)."""
    path = folder / "picture.png"
    if not path.exists():
        synthetic_picture().pixels.save(path)
    return replace(bench_job(res, steps), image=str(path.resolve()), fit="crop")


def first_frame(vae_master: torch.nn.Module, picture, device: str) -> torch.Tensor:
    """The picture's latent as the diffuse stage makes it: the encoder half alone on the card."""
    vae = fullsize.clone(vae_master)
    vae.decoder = None
    try:
        return stages.encode_first_frame(vae.to(device), picture, device=device)
    finally:
        del vae
        free_cuda()


def run_ours(setup: dict, job, picture, steps: int, budget: int, *, frame_timesteps: bool) -> tuple:
    device, masters = setup["device"], setup["masters"]
    clock = Clock(device)
    plans_used: dict[str, str] = {}
    attempts: list[str] = []
    with_plans = functools.partial(
        on_plans,
        masters=masters,
        sizes=setup["sizes"],
        job=job,
        device=device,
        budget=budget,
        record_stream=False,
        fp8=False,
        plans_used=plans_used,
        attempts=attempts,
    )
    embeds, encode_s = clock.phase(
        "text",
        lambda: with_plans(
            encode.STAGE,
            lambda plan, te: stages.encode_texts(
                te, setup["tokenizer"], [PROMPT, NEGATIVE], device=device, max_sequence_length=512
            ),
        ),
    )
    latent, condition_s = clock.phase("condition", lambda: first_frame(masters["vae"], picture, device))
    times: list[float] = []
    on_step, last = step_timer(clock, times)
    # The diffuse stage's ladder with the switch as the case asks (estimates follow it).
    stage = replace(diffuse.STAGE, ladder=functools.partial(diffuse.ladder, frame_timesteps=frame_timesteps))

    def body(plan, transformer):
        noise = stages.job_noise(job, transformer.config.in_channels, temporal=4, spatial=16, device=device)
        times.clear()
        last[0] = time.perf_counter()
        return stages.denoise(
            transformer,
            tiny.build_scheduler(),
            noise,
            embeds[:1],
            embeds[1:],
            steps=steps,
            guidance=job.guidance,
            compute_dtype=transformer.dtype if device != "cpu" else torch.float32,
            shared_timestep=plan.options.shared_timestep,
            cfg_batch=plan.options.cfg_batch,
            condition=latent,
            frame_timesteps=plan.options.frame_timesteps,
            on_step=on_step,
        )

    latents, _ = clock.phase("denoise", lambda: with_plans(stage, body))
    frames, decode_s = clock.phase(
        "frames",
        lambda: with_plans(
            decode.STAGE, lambda plan, vae: stages.decode_latents(vae, latents, device=device)
        ),
    )
    result = dict(
        encode_s=encode_s + condition_s,
        condition_s=condition_s,
        step_times=times,
        decode_s=decode_s,
        peaks=clock.phase_peaks,
        plans=plans_used,
        oom_attempts=attempts,
    )
    return result, latents.float().cpu(), frames


def run_stock(setup: dict, job, picture, steps: int) -> tuple:
    from diffusers import WanImageToVideoPipeline

    device, masters = setup["device"], setup["masters"]
    te, tr, vae = (fullsize.clone(masters[k]) for k in ("text_encoder", "transformer", "vae"))
    pipe = WanImageToVideoPipeline(
        tokenizer=setup["tokenizer"],
        text_encoder=te,
        transformer=tr,
        vae=vae,
        scheduler=tiny.build_scheduler(),
        expand_timesteps=True,
    ).to(device)
    clock = Clock(device)
    # WanPipeline's encode_prompt (t2v's): the I2V pipeline's own calls ftfy, which may be missing.
    embeds, encode_s = clock.phase(
        "text",
        lambda: stages.encode_texts(
            te, setup["tokenizer"], [PROMPT, NEGATIVE], device=device, max_sequence_length=512
        ),
    )
    times: list[float] = []
    on_step, last = step_timer(clock, times)

    def call():
        last[0] = time.perf_counter()
        return pipe(
            image=picture,
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            height=job.height,
            width=job.width,
            num_frames=job.frames,
            num_inference_steps=steps,
            guidance_scale=job.guidance,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="latent",
            callback_on_step_end=lambda *a: on_step() or {},
        ).frames

    latents, _ = clock.phase("denoise", call)
    frames, decode_s = clock.phase("frames", lambda: stages.decode_latents(pipe.vae, latents, device=device))
    result = dict(encode_s=encode_s, step_times=times, decode_s=decode_s, peaks=clock.phase_peaks, plans=None)
    pipe = te = tr = vae = None  # noqa: F841  (the last references, before the next case)
    free_cuda()
    return result, latents.float().cpu(), frames


def run_case(case: str, setup: dict, job, picture, steps: int) -> tuple:
    device = setup["device"]
    cap = case_cap(case)
    if device == "cuda":
        fraction = cap * GiB / setup["total_mem"] if cap else 1.0
        torch.cuda.set_per_process_memory_fraction(fraction)
        free_cuda()
    if case.startswith("stock"):
        return run_stock(setup, job, picture, steps)
    budget = cap * GiB if cap else (torch.cuda.mem_get_info()[0] if device == "cuda" else 0)
    return run_ours(setup, job, picture, steps, budget, frame_timesteps=not case.endswith("-token"))


def run_resolution(res: str, args: argparse.Namespace, setup: dict, records: list) -> None:
    job, reference = image_job(res, args.steps, args.out), None
    picture = images.fit_picture(images.read_picture(job.image), job.width, job.height, job.fit)
    for case in args.cases.split(","):
        print(f"--- {res} {case}", flush=True)
        try:
            result, latents, video = run_case(case, setup, job, picture, args.steps)
        except Exception as exc:  # one failed case must not lose the others' numbers
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
            records.append(
                dict(config=case, resolution=res, cap_gib=case_cap(case), error=error, gpu=setup["gpu"])
            )
            free_cuda()
            continue
        record = make_record(case, res, result, args.steps, setup["gpu"])
        record["frame_timesteps"] = None if case.startswith("stock") else not case.endswith("-token")
        record["condition_s"] = result.get("condition_s")
        if reference is None and case == "stock-gpu":
            reference = (latents, video)
        elif reference is not None:
            compare(record, reference, latents, video)
        records.append(record)
        (args.out / "image_to_video.json").write_text(json.dumps(records, indent=1))
        shown = ("config", "peak_reserved_gib", "step_s", "total_50_steps_s", "plans")
        print(json.dumps({k: record.get(k) for k in shown + ("latents_rel_diff_vs_stock_gpu",)}), flush=True)
        del latents, video
        free_cuda()


def encode_only(args: argparse.Namespace, setup: dict) -> None:
    """Peak card memory of the first-frame encode, besides the encoder's weights, per resolution."""
    rows = []
    for res in args.resolutions.split(","):
        job = bench_job(res, 1)
        picture = images.fit_picture(
            synthetic_picture(), job.width, job.height, "crop"
        )  # PIL, the clip's size
        vae = fullsize.clone(setup["masters"]["vae"])
        vae.decoder = None
        vae.to(setup["device"])
        free_cuda()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()  # the encoder half's
        start = time.perf_counter()
        stages.encode_first_frame(vae, picture, device=setup["device"])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - weights
        rows.append(
            dict(
                resolution=res,
                encoder_weights_gib=weights / GiB,
                encode_peak_gib=peak / GiB,
                bytes_per_pixel=peak / (job.height * job.width),
                encode_s=time.perf_counter() - start,
                gpu=setup["gpu"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        del vae
        free_cuda()
    (args.out / "first_frame_encode.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with the built-in tiny model")
    parser.add_argument("--resolutions", default="1280x704x121,832x480x81")
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--encode-only", action="store_true", help="only the first-frame encode's peak")
    args = parser.parse_args()
    if args.tiny and args.resolutions == parser.get_default("resolutions"):
        args.resolutions = "96x64x9"
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    if args.encode_only:  # the VAE alone
        masters = {"vae": tiny.build_vae() if args.tiny else fullsize.build("vae", dtype=torch.float32)}
    else:
        masters = build_masters(args.tiny)
    setup = dict(
        device=device,
        gpu=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        total_mem=torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0,
        masters=masters,
        tokenizer=tiny.build_tokenizer(),  # byte-level ids: the encoder's compute does not depend on them
        sizes={c: ComponentSizes.from_modules(**{c: m}) for c, m in masters.items()},
    )
    if args.encode_only:
        encode_only(args, setup)
        return
    records: list = []
    for res in args.resolutions.split(","):
        run_resolution(res, args, setup, records)


if __name__ == "__main__":
    main()
