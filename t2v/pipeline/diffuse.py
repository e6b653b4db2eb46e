"""Diffuse: the job's seed noise denoised by the transformer, guided by the prompt's embeddings; for an
image job, with its picture's latent as the first frame (`t2v.pipeline.condition`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from t2v import attention, checkpoints, lora, samplers, stages, step_caches
from t2v import frame_timesteps as per_frame
from t2v.digests import Verdict
from t2v.errors import NonFiniteOutput
from t2v.jobs import JobSpec
from t2v.pipeline import condition, encode
from t2v.pipeline.stage import KeyInputs, Stage, Work, Writer
from t2v.placement import chunk_feed_forward
from t2v.plans import ComponentSizes, Placement, PlanOptions, StagePlan, option
from t2v.store import Folder

log = logging.getLogger("t2v")


@dataclass(frozen=True)
class DiffuseOptions(PlanOptions):
    cfg_batch: int = option(2, label=lambda n: f"cfg{n}")
    """Conditional and unconditional passes as one batch of 2 (half the weight traffic when
    offloading) or as two batches of 1 (half the activations)."""
    shared_timestep: bool = option(True, label=lambda shared: None if shared else "token-ts")
    """One timestep per sample instead of one per token (the same values in text-to-video). Never
    for an image job, whose first frame is at timestep 0: its ladder sets it off."""
    frame_timesteps: bool = option(True)
    """With per-token timesteps, embed each distinct value once and broadcast it over its latent
    frame's tokens (`t2v.frame_timesteps`), instead of a (batch, tokens, 6, dim) projection: within
    fp32 rounding of the per-token path. Not in the plan's name: a ladder never holds two plans that
    differ in it alone."""
    ffn_chunks: int = option(1, label=lambda n: f"ffn{n}" if n > 1 else None)
    """The feed-forward run over this many slices of the sequence (its N x 14336 intermediate is the
    largest activation)."""
    fp8_storage: bool = option(False, label=lambda on: "fp8" if on else None, moves_weights=True)
    """Weights stored in float8_e4m3fn and cast to bf16 per layer; loses fidelity, opt-in."""
    adapters: tuple[lora.Adapter, ...] = option((), moves_weights=True)
    """LoRA adapters the placed transformer holds (`t2v.lora`): every one the run has asked for so far,
    set by `compute` from the stage's state; a job only switches among them."""

    def prepare(self, module: torch.nn.Module, whole_to: torch.device | None = None) -> torch.nn.Module:
        # First, on the module as loaded: its layer names as the files name them (before the FFN
        # wrappers), and its adapter weights in the groups the offloading hooks record.
        lora.load(module, self.adapters)
        # Before any offloading hook, which must onload the weights before these forwards run; inert
        # until a timestep per frame comes, so every placed transformer gets them.
        per_frame.install(module)
        chunk_feed_forward(module, self.ffn_chunks)
        if self.fp8_storage:
            module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=module.dtype)
        return module

    def configure(self, module: torch.nn.Module) -> torch.nn.Module:
        chunk_feed_forward(module, self.ffn_chunks)
        return module


def key(k: KeyInputs) -> dict[str, object]:
    # As the diffusion runs it: a job that names no sampler on a preset folder keys as its preset.
    job = samplers.resolve(k.job, k.model.rules)
    parts: dict[str, object] = dict(
        model=k.model.identity,
        seed=job.seed,
        height=job.height,
        width=job.width,
        frames=job.frames,
        steps=job.steps,
        guidance=job.guidance,
        fp8=k.fp8,
        step_cache=job.step_cache,
    )
    first_frame = condition.key(k)
    if first_frame is not None:  # only then: a text-only job keeps the key it always had
        parts["first_frame"] = first_frame
    if job.lora:  # likewise: a job without a LoRA keeps its key
        parts["lora"] = lora.key_part(job.lora)
    sampler = samplers.Sampler.of(job).key_part()
    if sampler is not None:  # and one on the model's scheduler
        parts["sampler"] = sampler
    kernel = attention.key_part(job.attention)
    if kernel is not None:  # only the lossy one: the exact kernels change bf16 rounding, not the clip
        parts["attention"] = kernel
    return parts


def diffusion_tokens(job: JobSpec) -> int:
    return ((job.frames - 1) // 4 + 1) * (job.height // 32) * (job.width // 32)


TOKEN_MODULATION_BYTES = 2 + 4 + 4
"""Per element of an image job's (batch, tokens, 6, dim) timestep projection on the per-token path:
stored in bf16, then in every block cast to fp32 and added to the block's table in fp32 (5 GB per
sample at 1280x704x121). `frame_timesteps` leaves a few frames' worth."""


def activation_bytes(
    s: ComponentSizes, job: JobSpec, *, batch: int, ffn_chunks: int, frame_timesteps: bool = True
) -> int:
    n = diffusion_tokens(job)
    # Bytes per token and sample, fitted to the full-size model on an H100 (docs/benchmarks.md):
    # 86 kB allocated with the FFN whole, 72 kB with it in 4 chunks, so ~22 dim-wide bytes-per-channel
    # (fp32 norms and residuals, bf16 q/k/v and attention output) plus ~1.3 bytes per FFN channel that
    # chunking divides.
    per_token = 22 * s.transformer_dim + 1.3 * s.transformer_ffn_dim / ffn_chunks
    # Reserved runs 20-30% above allocated while weights stream in on a second CUDA stream (each stream
    # has its own pool in PyTorch's caching allocator): measured +0.5 GiB at 480P, +0.9-1.5 GiB at 720P.
    if job.image is not None and not frame_timesteps:
        per_token += 6 * s.transformer_dim * TOKEN_MODULATION_BYTES
    return int(1.3 * batch * n * per_token)


def attempt_bytes(
    s: ComponentSizes, job: JobSpec, *, batch: int, ffn_chunks: int, frame_timesteps: bool
) -> int:
    """Card memory an attempt needs besides the resident weights: the denoising's activations, or,
    before them, an image job's first-frame encode (freed before the first step)."""
    denoise = activation_bytes(s, job, batch=batch, ffn_chunks=ffn_chunks, frame_timesteps=frame_timesteps)
    return max(denoise, condition.encode_bytes(job))


def ladder(
    s: ComponentSizes,
    job: JobSpec,
    *,
    device: str,
    fp8: bool = False,
    frame_timesteps: bool = True,
    night: Sequence[JobSpec] = (),
) -> list[StagePlan]:
    """`night`: the run's jobs of the stage (with `job` or without), whose LoRA files the placed
    transformer holds too (`Adapters.for_job`), so that a job without one is planned with them on the
    card; each file counts once."""
    # An image job's timestep is per token (0 on the picture's frame): the shared one is never its.
    timing = dict(shared_timestep=job.image is None, frame_timesteps=frame_timesteps)
    files = (*job.lora, *(item for other in night for item in other.lora))
    extra = lora.adapter_bytes(files, s.transformer_element_bytes) if files else 0  # the night's, loaded
    if not device.startswith("cuda"):
        # No card: RAM is the budget and it is ample for one component, but the same options exist,
        # so the out-of-memory fallback has somewhere to go (and is tested on this path).
        options = DiffuseOptions(fp8_storage=fp8, **timing)
        cpu = StagePlan(STAGE.name, Placement.CPU, device="cpu", options=options)
        return [cpu] + ([cpu.with_options(cfg_batch=1)] if job.cfg else [])
    blocks = max(1, round(s.transformer_bytes / max(s.transformer_block_bytes, 1)))
    # The adapters sit in their layers' blocks (LoRA trainers adapt the blocks' layers): with the whole
    # transformer on the card all of them, else each block's share goes where its block goes, streamed
    # with it or resident. fp8 storage leaves them in the compute dtype.
    weights = s.transformer_bytes // (2 if fp8 else 1) + extra
    block = s.transformer_block_bytes // (2 if fp8 else 1) + extra // blocks
    non_block = max(s.transformer_bytes - blocks * s.transformer_block_bytes, 0)
    streamed = non_block + 2 * block  # the unmatched group, the block computing, the block prefetched
    # (batch, ffn_chunks) fastest first: CFG as one batch halves the weight traffic of offloading,
    # chunking the FFN costs little; two passes double the traffic.
    shapes = [(2, 1), (2, 4), (1, 1), (1, 8)] if job.cfg else [(1, 1), (1, 8)]
    plans = []
    for placement, resident in ((Placement.GPU, weights), (Placement.GROUP, streamed)):
        streaming = placement is Placement.GROUP
        for batch, chunks in shapes:
            act = attempt_bytes(s, job, batch=batch, ffn_chunks=chunks, frame_timesteps=frame_timesteps)
            plans.append(
                StagePlan(
                    STAGE.name,
                    placement,
                    device=device,
                    options=DiffuseOptions(cfg_batch=batch, ffn_chunks=chunks, fp8_storage=fp8, **timing),
                    block_bytes=block if streaming else 0,
                    blocks=blocks if streaming else 0,
                    estimate_bytes=resident + act,
                )
            )
    leaf = StagePlan(
        STAGE.name,
        Placement.LEAF,
        device=device,
        options=DiffuseOptions(cfg_batch=1, ffn_chunks=8, fp8_storage=fp8, **timing),
        estimate_bytes=2 * s.transformer_largest_leaf_bytes
        + attempt_bytes(s, job, batch=1, ffn_chunks=8, frame_timesteps=frame_timesteps)
        + extra // blocks,  # leaf level onloads each adapter's layers as they run: a block's share
    )
    return plans + [leaf]


@contextmanager
def step_cache(
    transformer: torch.nn.Module, setting: float | str, *, steps: int = 0, image: bool = False
) -> Iterator[None]:
    """The job's step cache (`t2v.step_caches`: a first-block threshold, or "mag" with the job's step
    count and whether it starts from a picture) on `transformer` for one job; the component outlives
    the job, the cache must not (the next job may not ask for it, and its state belongs to this job's
    steps)."""
    config = step_caches.config(setting, steps=steps, image=image)
    if config is None:
        yield
        return
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


class DiffuseState(condition.FirstFrames):
    """What the stage keeps for a run: the first frames' encoder (`condition.FirstFrames`) and the LoRA
    adapters its jobs have asked for (`t2v.lora.Adapters`)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = lora.Adapters()


CHECKPOINTS = Folder(folder="diffuse-checkpoints", suffix=".safetensors")
"""A diffusion's state between steps, under its job's key; deleted once its latents are stored."""


class _Checkpointing:
    """Saves the diffusion's state after a step once `every_s` seconds have passed since the last save
    (0: after every step; None: never, as with a step cache, whose state is not saved), and tells the
    hooks each step is done: its progress (the live night view), then `on_step` (the kill-at-a-step
    drill, which must find the step already reported)."""

    def __init__(self, work: Work, every_s: float | None) -> None:
        self.work, self.every_s = work, every_s
        self.last = time.monotonic()
        # Made as the denoising starts: the job shows its step count from 0 rather than nothing.
        work.progress(0, work.job.steps)

    def __call__(self, done: int, latents: torch.Tensor, scheduler: object) -> None:
        work = self.work
        due = self.every_s is not None and time.monotonic() - self.last >= self.every_s
        if done < work.job.steps and due:
            state = checkpoints.scheduler_state(scheduler)
            if state is not None:
                with work.run.store.writing(CHECKPOINTS, work.key) as temp:
                    checkpoints.save(temp, checkpoints.Checkpoint(done, latents, state))
                self.last = time.monotonic()
        work.progress(done, work.job.steps)
        for hook in work.run.hooks.on_step:
            hook(work.stage, work.job, done)


def _resume(work: Work) -> checkpoints.Checkpoint | None:
    """The job's last saved diffusion state, if one is stored and whole."""
    verdict, _ = work.run.store.check(CHECKPOINTS, work.key)
    if verdict is not Verdict.OK:
        return None
    saved = checkpoints.load(work.run.store.path(CHECKPOINTS, work.key))
    log.info("%s: resuming the diffusion after step %d of %d", work.job.template, saved.step, work.job.steps)
    return saved


def compute(work: Work) -> Writer:
    # The job as its key saw it (a preset folder's sampler where it names none): the checkpoints and
    # the progress count its steps. dmd resumes exactly: its fresh noise comes from the seed and step.
    work = replace(work, job=samplers.resolve(work.job, work.run.model.rules))
    job, options = work.job, work.plan.options
    sampler = samplers.Sampler.of(job)
    # A step cache's state is not saved: a resumed diffusion would differ from an uninterrupted one.
    resumable = not step_caches.enabled(job.step_cache)
    embeds = work.load_tensors(encode.STAGE)
    # Before the transformer is placed: the first job's encode has the card to itself.
    first_frame = work.state.latent(work) if job.image is not None else None
    # Placed with every adapter the run's jobs ask for (loaded before its hooks: the jobs still to
    # diffuse, as the flow announced them, so the transformer is placed once a night), then the job's
    # alone made active. A stage run without that list places it again for a file new to the run.
    expected = [j.lora for j in work.run.pending(STAGE)]
    adapters = work.state.adapters.for_job(job.lora, expected=expected)
    placed = replace(work, plan=work.plan.with_options(adapters=adapters))
    transformer = placed.component()
    lora.activate(transformer, job.lora, fold=work.run.settings.lora_fuse, device=work.device)
    # The kernel for this job's size (`auto` probes the card once per size), named on its run-log row.
    shape = attention.Shape.of(transformer, diffusion_tokens(job), work.run.model.weight_dtype)
    kernel = attention.use(transformer, job.attention, shape, work.device)
    work.label_plan(f"attn-{kernel}")
    temporal, spatial = work.run.vae_factors()
    noise = stages.job_noise(
        job, transformer.config.in_channels, temporal=temporal, spatial=spatial, device=work.device
    )
    with (
        tqdm(total=job.steps, desc=f"{job.template} denoise", unit="step", leave=False) as bar,
        step_cache(transformer, job.step_cache, steps=job.steps, image=job.image is not None),
    ):
        latents = stages.denoise(
            transformer,
            sampler.scheduler(seed=job.seed) or work.run.scheduler(),
            noise,
            embeds["cond"],
            embeds.get("uncond"),
            steps=job.steps,
            guidance=job.guidance,
            compute_dtype=work.run.model.weight_dtype,
            shared_timestep=options.shared_timestep,
            cfg_batch=options.cfg_batch,
            condition=first_frame,
            frame_timesteps=options.frame_timesteps,
            on_step=lambda i, n: bar.update(1),
            resume=_resume(work) if resumable else None,
            after_step=_Checkpointing(work, work.run.settings.checkpoint_seconds if resumable else None),
        )
    if not torch.isfinite(latents).all():
        raise NonFiniteOutput(
            f"{job.template}: the latents hold NaN or infinite values after {job.steps} steps; nothing is "
            "stored or published (the model's weights, or a switch such as --fp8-storage, may be the cause)"
        )
    # Off the card while it is ours: the write then runs beside the next job's compute.
    write = work.save_tensors({"latents": latents.cpu()})
    store, key = work.run.store, work.key

    def write_then_forget() -> None:
        write()
        store.remove(CHECKPOINTS, key)

    return write_then_forget


def preload(transformer: torch.nn.Module, jobs: Sequence[JobSpec]) -> None:
    """The announced jobs' LoRA files, injected as the loader thread loads the transformer, before it
    page-locks the host copy: injected at placing, they left tensors unlocked, so `Residency.pin`
    page-locked the whole copy again (placing with two files took 5.4 s on the H200 against 0.13 s
    without, docs/benchmarks.md). `compute` asks for the same adapters and finds them loaded."""
    lora.load(transformer, lora.Adapters().for_job((), expected=[j.lora for j in jobs]))


STAGE = Stage(
    name="diffuse",
    output="latents",
    suffix=".safetensors",
    summary="Denoise the job's latents from its seed; returns their store key.",
    task_name="diffuse-latents",
    key=key,
    compute=compute,
    inputs=(encode.STAGE,),
    component="transformer",
    ladder=ladder,
    state=DiffuseState,
    preload=preload,
)
