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

GPU slots. diffuse and decode run inside `gpu_slot()`: with `T2V_GPU_LIMIT` naming a Prefect global
concurrency limit (and a Prefect server at `PREFECT_API_URL`), each holds one slot of it while it runs.
`prefect.concurrency.sync.concurrency` (Prefect >= 3.4) takes the slot as a *lease* with a TTL
(`T2V_GPU_LEASE_S`, 60 s) that a thread of this process renews every 45 s. A process killed with
kill -9 renews nothing, so the server's repossessor service (every 15 s) returns its slot at most about
TTL + 15 s after the kill: the next night never waits for a dead run's slot. Two things would break
that guarantee and are avoided on purpose:
- tag concurrency limits (`prefect concurrency-limit create gpu 1`): their slots are held under a
  ~100-year lease until the task run leaves RUNNING, which a killed process never reports. The tasks
  keep their "gpu" tag for filtering in the UI; do not put a tag limit on it.
- a temporary server (no `PREFECT_API_URL`): its leases live in that server's memory and die with the
  killed process while the limit's slot count stays in the database. So without a server no slot is taken.
A served deployment should also keep leases where a server restart does not lose them:
`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.settings import PREFECT_API_URL

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


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold one lease-based slot of the `T2V_GPU_LIMIT` global concurrency limit, if there is one."""
    settings = get_settings()
    if not settings.gpu_limit or not PREFECT_API_URL.value():
        yield
        return
    # strict=False: a missing limit means "no limit" (with Prefect's warning), not a failed night.
    # A failed lease renewal does not stop the stage: the card's memory, not the slot, is what the
    # memory planner protects, and half a diffusion thrown away helps nobody.
    with concurrency(
        settings.gpu_limit,
        occupy=1,
        lease_duration=settings.gpu_lease_s,
        strict=False,
        raise_on_lease_renewal_failure=False,
    ):
        yield


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
    with gpu_slot():
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
    with gpu_slot():
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
