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

GPU slot. The GPU stages of a run (encode, diffuse, decode over all of its jobs) run inside
`gpu_slot`, which holds one slot of the global concurrency limit `gpu` that `t2v deploy` sets to one per
GPU: from the run's first encode to its last decode, when the components it kept loaded have left the
card. A `generate` sent to the same server waits for the night's GPU stages as a whole, not only for
its current task: between two tasks the night still holds resident blocks, pinned weights and the CUDA
context on the card. The slot is a lease (60 s) renewed by this process; after kill -9 the server's
repossessor gives it back once the lease runs out (tests/test_gpu_slot.py). One slot per run rather than
per task also keeps the server out of the loop between tasks: with a tag limit per task, each of the
night's 18 GPU tasks took and gave back a lease through the server's database, 1-2 s each on the H100
benchmark machine, where its SQLite shares a disk with the clips being written (docs/benchmarks.md).
Serve with `PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem`
so that a server restart does not lose a held lease and leave its slot counted.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from prefect import task
from prefect.cache_policies import NO_CACHE

from t2v.context import RunContext, open_runlog
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.runner import StageRunner, components_held
from t2v.settings import get_settings
from t2v.store import Store
from t2v.vram import probe


def runner_for(ctx: RunContext) -> StageRunner:
    """The run's StageRunner in this process, shared by its tasks with their tokenizer and run log.

    Settings (T2V_INJECT_OOM, the VRAM budget) are read when a run's first task starts; loaded
    components live in the process-wide residency cache, so they outlast a run's runner.
    """
    with _MAKING_RUNNER:  # a stage's tasks start together, in threads: one of them makes it
        return _runner_for(ctx)


_MAKING_RUNNER = threading.Lock()


@functools.lru_cache(maxsize=4)
def _runner_for(ctx: RunContext) -> StageRunner:
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
        compile_blocks=ctx.compile_blocks,
    )


GPU_LIMIT = "gpu"
"""The global concurrency limit `t2v deploy` creates: one slot per GPU of the host."""
LEASE_S = 60
"""Lease on a held slot, renewed by this process while it lives; what a killed run holds at most."""


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold a slot of the `gpu` limit for the GPU stages inside, as a lease owned by this flow run; on
    the way out, free what the stages kept on the card, then give the slot back. Without such a limit
    on the server (a plain `t2v nightly`, no deployment) there is nothing to wait for."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            slot = True
        except ObjectNotFound:
            slot = False
    if slot:
        run = FlowRunContext.get()
        holder = ConcurrencyLeaseHolder(type="flow_run", id=run.flow_run.id) if run and run.flow_run else None
        held = concurrency(GPU_LIMIT, occupy=1, lease_duration=LEASE_S, strict=True, holder=holder)
    else:
        logging.getLogger("t2v").info("no `%s` concurrency limit on this server: no slot to take", GPU_LIMIT)
        held = nullcontext()
    with held, components_held():
        yield


def prefetch(component: str, jobs: Sequence[JobSpec], ctx: RunContext) -> bool:
    """Start loading `component` for a later stage of the run into host memory while the current stage
    runs (not a task: it returns at once; a stage that has to wait for it counts the wait in its row)."""
    return runner_for(ctx).prefetch(component, jobs)


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
