"""The pipeline's stages as Prefect tasks: one per stage of the registry (`t2v.pipeline.PIPELINE`).

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

GPU slot. The GPU stages of a run (those with a component, over all of its jobs) run inside
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

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from t2v.context import RunContext
from t2v.engine import Hooks, StageRunner
from t2v.jobs import JobSpec
from t2v.pipeline import PIPELINE, Stage

_RUNNERS: dict[str, StageRunner] = {}
"""The runner of each run going on in this process, by run id: Prefect hands a task its arguments, and
a run's tasks (threads of the flow's process) must share its runner, card and loaded components."""
_RUNNERS_LOCK = threading.Lock()


def runner_for(ctx: RunContext) -> StageRunner:
    """The run's StageRunner in this process (made by `gpu_slot`, or here for a task run alone)."""
    with _RUNNERS_LOCK:  # a stage's tasks start together, in threads: one of them makes it
        if ctx.run_id not in _RUNNERS:
            _RUNNERS[ctx.run_id] = StageRunner(ctx)
        return _RUNNERS[ctx.run_id]


@contextmanager
def run_open(ctx: RunContext, hooks: Hooks | None = None) -> Iterator[StageRunner]:
    """The run's runner for the tasks inside (with `hooks`, from a benchmark or a test); forgotten at
    the end."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS[ctx.run_id] = StageRunner(ctx, hooks=hooks)
    try:
        yield runner
    finally:
        with _RUNNERS_LOCK:
            _RUNNERS.pop(ctx.run_id, None)


GPU_LIMIT = "gpu"
"""The global concurrency limit `t2v deploy` creates: one slot per GPU of the host."""
LEASE_S = 60
"""Lease on a held slot, renewed by this process while it lives; what a killed run holds at most."""


@contextmanager
def gpu_slot(ctx: RunContext) -> Iterator[None]:
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
    with held, runner_for(ctx).residency.held():
        yield


@contextmanager
def watched(ctx: RunContext) -> Iterator[None]:
    """Record the run's progress, memory timeline and heartbeat in the run log while inside (its
    runner's `LiveRecorder`: one daemon thread, a write a second), for the dashboard's live view."""
    with runner_for(ctx).live:
        yield


def prefetch(stage: Stage, jobs: Sequence[JobSpec], ctx: RunContext) -> bool:
    """Start loading `stage`'s component into host memory while the current stage runs (not a task: it
    returns at once; a stage that has to wait for it counts the wait in its row)."""
    return runner_for(ctx).prefetch(stage, jobs)


def stage_task(stage: Stage) -> Task[[JobSpec, RunContext], str]:
    """The Prefect task of `stage`: it hands the job to the run's runner and returns a short string (a
    store key, or the published clip's path); tensors never pass through Prefect."""

    def run_stage(job: JobSpec, ctx: RunContext) -> str:
        return str(runner_for(ctx).run(stage, job))

    run_stage.__doc__ = stage.summary
    run_stage.__name__ = run_stage.__qualname__ = stage.name
    return task(
        run_stage,
        name=stage.task_name,
        task_run_name=f"{stage.name}-{{job.template}}",
        retries=0,
        cache_policy=NO_CACHE,
        persist_result=False,
    )


_TASKS: dict[str, Task[[JobSpec, RunContext], str]] = {}


def task_for(stage: Stage) -> Task[[JobSpec, RunContext], str]:
    """The task of `stage`, made the first time it is asked for."""
    with _RUNNERS_LOCK:
        if stage.name not in _TASKS:
            _TASKS[stage.name] = stage_task(stage)
        return _TASKS[stage.name]


TASKS = {stage.name: task_for(stage) for stage in PIPELINE}
"""The built-in stages' tasks by stage name."""
