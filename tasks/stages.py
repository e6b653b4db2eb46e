"""The four stages of a job as Prefect tasks.

Each task hands one job to this process's StageRunner for the run and returns a short string: a store
key, or the published clip's path; tensors never pass through Prefect. Skipping stored outputs,
choosing a memory plan, falling back to a leaner plan on out-of-memory and writing run-log rows all
happen in the runner, so the tasks have no retries and persist no results.
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from t2v.context import RunContext, open_runlog
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.runner import StageRunner
from t2v.settings import get_settings
from t2v.store import Store
from t2v.vram import probe


@functools.lru_cache(maxsize=4)
def runner_for(ctx: RunContext) -> StageRunner:
    """The run's StageRunner in this process, shared by its tasks with their tokenizer and run log.

    Settings (T2V_INJECT_OOM, the VRAM budget) are read when a run's first task starts; loaded
    components live in the process-wide residency cache, so they outlast a run's runner.
    """
    settings = get_settings()
    return StageRunner(
        model=resolve_model(ctx.model),
        store=Store(ctx.store_dir),
        runlog=open_runlog(ctx.database_url),
        run_id=ctx.run_id,
        settings=settings,
        memory=probe(budget_gib=settings.vram_budget_gib),
        outputs_dir=ctx.outputs_dir,
        fp8=ctx.fp8_storage,
    )


@task(
    name="encode-prompt",
    task_run_name="encode-{job.template}",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def encode(job: JobSpec, ctx: RunContext) -> str:
    """Encode the job's prompt (and negative prompt) to embeddings; returns their store key."""
    return runner_for(ctx).encode(job)


@task(
    name="diffuse-latents",
    task_run_name="diffuse-{job.template}",
    tags=["gpu"],
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def diffuse(job: JobSpec, ctx: RunContext) -> str:
    """Denoise the job's latents from its seed; returns their store key."""
    return runner_for(ctx).diffuse(job)


@task(
    name="decode-frames",
    task_run_name="decode-{job.template}",
    tags=["gpu"],
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def decode(job: JobSpec, ctx: RunContext) -> str:
    """Decode the job's latents to lossless frames; returns their store key."""
    return runner_for(ctx).decode(job)


@task(
    name="watermark-clip",
    task_run_name="watermark-{job.template}",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def watermark(job: JobSpec, ctx: RunContext) -> str:
    """Watermark the frames into an H.264 MP4 and publish it; returns the clip's path."""
    return str(runner_for(ctx).watermark(job))
