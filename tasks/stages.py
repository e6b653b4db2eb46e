"""The four stages of a job as Prefect tasks.

Each task hands one job to this process's StageRunner for the run and returns a short string: a store
key, or the published clip's path; tensors never pass through Prefect. Skipping stored outputs,
choosing a memory plan, falling back to a leaner plan on out-of-memory and writing run-log rows all
happen in the runner, so the tasks have no retries and persist no results.

Why no Prefect cache (NO_CACHE) although a retried or re-run flow must not recompute finished stages:
the store already is that cache. The runner checks for the stage's output file before it does any work,
so a task called again for a finished stage logs a "skipped" row and returns the same key at once. A
Prefect cache keyed on the same store key would be a second record of "done" kept elsewhere (Prefect's
result storage), which can say done when the file was deleted or never renamed into place after a
kill -9; the file itself cannot.

GPU slots. diffuse and decode carry the tag "gpu"; `t2v deploy` puts a concurrency limit on it (one
slot per GPU), so a manual `generate` waits for the nightly run's GPU task. In Prefect 3.9 a tag limit
is a global limit named "tag:gpu", and the task engine takes its slot on the client side
(`task_engine.py`: `concurrency(["tag:gpu"], holder=<task run>, lease_duration=60)`) as a *lease* that a
thread of this process renews every 45 s. A process killed with kill -9 renews nothing, so a Prefect
server's repossessor service (every 15 s) gives the slot back at most ~75 s after the kill: a killed
night does not leave the next one waiting. tests/test_tasks.py checks that the slot is a lease held by
the task run and is given back; the kill itself needs a served Prefect (the test server runs no
repossessor). Two setups lose that guarantee: a server that keeps leases in memory and restarts while a
slot is held (the count stays taken, the lease that would free it is gone; serve with
`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem`), and
tasks tagged "gpu" that run somewhere else than the task engine. So no explicit `concurrency(...)`
block here: it would be a second slot on top of the tag's, or (named "tag:gpu") wait for its own.
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
    tags=["gpu"],  # the text encoder runs on the card too
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
