"""How every flow runs its jobs through the pipeline: order and batching, nothing else.

Stage-major: each stage with a component runs for every job before the next starts, so each component
is loaded once per run, with the next one read into page-locked host memory while the stage before it
runs. The stages without one (the CPU's: finishing the clip) run per job as soon as its last card
stage is done, beside the later jobs' card work. A job whose stage fails is left out of the later
stages; the other jobs go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from tqdm.auto import tqdm

from t2v.context import RunContext, open_runlog
from t2v.dashboard.summary import stage_table
from t2v.jobs import JobSpec
from t2v.pipeline import Stage, stages
from tasks.stages import gpu_slot, prefetch, task_for, watched

Logger = logging.Logger | logging.LoggerAdapter


def run_stages(jobs: Sequence[JobSpec], ctx: RunContext, logger: Logger, *, table: bool = True) -> dict:
    """The run's stages for `jobs`; records how the run ended. Returns {run_id, clips, failed}: the
    last stage's result (the published clip) by template, and each failed job's error."""
    runlog = open_runlog(ctx.settings.runlog_url)
    failed: dict[str, str] = {}
    pipeline = stages()
    on_card = [s for s in pipeline if s.on_card]
    off_card = _Chains([s for s in pipeline if not s.on_card], ctx, failed, logger)
    try:
        # The whole night is recorded live (steps, memory, heartbeat) for the dashboard; its last
        # figures are written before the run's status below.
        with watched(ctx):
            # The card is the run's from the first card stage to the last (tasks.stages.gpu_slot).
            with gpu_slot(ctx):
                for i, stage in enumerate(on_card):
                    for ahead in on_card[i : i + 2]:  # this stage's component (the first waits), the next's
                        prefetch(ahead, jobs, ctx)
                    then = off_card.start if stage is on_card[-1] else None
                    _stage(stage, jobs, ctx, failed, logger, then=then)
            results = off_card.collect(jobs)
    except BaseException as exc:
        # Not a job's failure (those are caught per job) but the run's: record how it ended.
        runlog.finish_run(ctx.run_id, status="failed" if isinstance(exc, Exception) else "interrupted")
        raise
    runlog.finish_run(ctx.run_id, status="failed" if failed else "ok")
    logger.info("run %s: %d clip(s), %d failed job(s)", ctx.run_id, len(results), len(failed))
    if table:
        _publish_stage_table(runlog.run(ctx.run_id), ctx.run_id, logger)
    return {"run_id": ctx.run_id, "clips": results, "failed": failed}


def _stage(
    stage: Stage,
    jobs: Sequence[JobSpec],
    ctx: RunContext,
    failed: dict[str, str],
    logger: Logger,
    then: Callable[[JobSpec], None] | None = None,
) -> None:
    """Run one stage task for every job that has not failed yet, all submitted at once, and wait for
    them: the runner lets one at a time compute on the card and writes each output after letting go of
    it, so a job's write overlaps the next job's compute. `then(job)` is called as each one succeeds."""
    futures = {task_for(stage).submit(job, ctx): job for job in jobs if job.template not in failed}
    for future in tqdm(as_completed(list(futures)), total=len(futures), desc=stage.name, unit="job"):
        job = futures[future]
        try:
            result = future.result()
        except Exception as exc:
            _failed(stage, job, exc, failed, logger)
        else:
            logger.info("%s %s: %s", stage.name, job.template, result)
            if then is not None:
                then(job)


class _Chains:
    """The stages off the card, run in order for each job from when `start(job)` is called."""

    def __init__(self, stages: list[Stage], ctx: RunContext, failed: dict[str, str], logger: Logger) -> None:
        self.stages, self.ctx, self.failed, self.logger = stages, ctx, failed, logger
        self._pending: dict[PrefectFuture, tuple[JobSpec, int]] = {}

    def start(self, job: JobSpec, index: int = 0) -> None:
        self._pending[task_for(self.stages[index]).submit(job, self.ctx)] = (job, index)

    def collect(self, jobs: Sequence[JobSpec]) -> dict[str, str]:
        """Wait for every chain; the last stage's results by template, in the jobs' order."""
        done: dict[str, str] = {}
        bar = tqdm(
            total=len(self._pending) * len(self.stages), desc=self.stages[-1].name if self.stages else ""
        )
        while self._pending:
            future = next(iter(as_completed(list(self._pending))))
            job, index = self._pending.pop(future)
            stage = self.stages[index]
            bar.update(1)
            try:
                result = future.result()
            except Exception as exc:
                _failed(stage, job, exc, self.failed, self.logger)
                continue
            self.logger.info("%s %s: %s", stage.name, job.template, result)
            if index + 1 < len(self.stages):
                self.start(job, index + 1)
            else:
                done[job.template] = result
        bar.close()
        return {job.template: done[job.template] for job in jobs if job.template in done}


def _failed(stage: Stage, job: JobSpec, exc: Exception, failed: dict[str, str], logger: Logger) -> None:
    failed[job.template] = f"{stage.name}: {type(exc).__name__}: {exc}"
    logger.error("%s %s: failed, skipping its later stages: %s", stage.name, job.template, exc)


def _publish_stage_table(run: dict, run_id: str, logger: Logger) -> None:
    """The run's per-stage figures (those `t2v dashboard` charts) as a keyed Prefect table artifact."""
    try:
        create_table_artifact(
            key="nightly-stages",
            table=stage_table(run),
            description=f"t2v run {run_id}: wall time and peak memory per job and stage",
        )
    except Exception as exc:
        # The clips and the run log are the run's results; a figure table the server did not
        # take is worth a warning, not a failed run.
        logger.warning("could not publish the stage table artifact: %s", exc)
