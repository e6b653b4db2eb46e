"""The nightly batch: every template of the catalogue, one stage at a time across all jobs.

Stage-major order loads each model component once per night (the text encoder for every prompt,
then the transformer for every job, then the VAE) and frees it before the next needs the card.
A job whose stage fails is left out of the later stages; the other jobs go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from tqdm.auto import tqdm

from t2v.context import RunContext, check_jobs, data_dir, open_runlog, runlog_url
from t2v.dashboard.summary import stage_table
from t2v.jobs import Catalogue, JobSpec
from t2v.models.registry import resolve_model
from t2v.plans import compile_pays
from t2v.rerun import Night
from t2v.runlog import RunLog
from t2v.settings import get_settings
from t2v.shards import select_shard
from t2v.store import Store, sweep_partials
from tasks.stages import decode, diffuse, encode, gpu_slot, prefetch, watermark


@flow(name="nightly")
def nightly(
    catalogue: str = "data/templates.toml",
    model: str = "tiny",
    fp8_storage: bool = False,
    shard: str | None = None,
) -> dict:
    """Make a clip for every template in `catalogue`; returns {run_id, clips, failed}.

    With `shard` "i/n" only every n-th template from the i-th: one GPU worker's part of the night.
    """
    logger = get_run_logger()
    settings = get_settings()
    ref = resolve_model(model)
    jobs = select_shard(Catalogue.from_file(catalogue, ref.rules).jobs, shard)
    check_jobs(jobs, ref, catalogue=catalogue)
    root = data_dir(settings)
    url = runlog_url(settings)
    runlog = open_runlog(url)
    clean_up_after_crashes(runlog, root)
    night = Night(jobs=jobs, outputs_dir=root / "outputs" / date.today().isoformat(), fp8_storage=fp8_storage)
    run_id = runlog.start_run(
        kind="nightly",
        model=ref.source or ref.spec,
        catalogue=str(Path(catalogue).resolve()),
        # The jobs as validated now: `t2v rerun` finishes this night even if the catalogue changes.
        jobs_json=night.to_json(),
    )
    ctx = RunContext(
        run_id=run_id,
        model=model,
        data_dir=root,
        outputs_dir=night.outputs_dir,
        database_url=url,
        fp8_storage=fp8_storage,
        compile_blocks=compile_pays((j.steps for j in jobs), settings.compile),
    )
    logger.info("run %s: %d job(s) from %s on model %s", run_id, len(jobs), catalogue, ref.identity)
    return run_stages(jobs, ctx, runlog, logger)


def clean_up_after_crashes(runlog: RunLog, root: Path) -> None:
    """Close run-log rows of dead processes and delete their temporary files, before a night starts."""
    runlog.mark_interrupted()
    Store(root / "store").sweep_partials()
    sweep_partials(root / "outputs")


def run_stages(
    jobs: tuple[JobSpec, ...],
    ctx: RunContext,
    runlog: RunLog,
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict:
    """The night's stages in stage-major order; records how the run ended. Shared with `rerun`."""
    failed: dict[str, str] = {}
    watermarking: dict[PrefectFuture, JobSpec] = {}

    def watermark_when_decoded(job: JobSpec) -> None:
        watermarking[watermark.submit(job, ctx)] = job

    try:
        # The card is the night's from the first encode to the last decode (tasks.stages.gpu_slot).
        with gpu_slot():
            # Each stage's component is read into page-locked host memory while the stage before it runs
            # (the text encoder's first: its stage waits for it).
            prefetch("text_encoder", jobs, ctx)
            prefetch("transformer", jobs, ctx)
            # Text encoder: embeddings of every prompt.
            _stage("encode", encode, jobs, ctx, failed, logger)
            prefetch("vae", jobs, ctx)
            # Transformer: denoised latents of every job.
            _stage("diffuse", diffuse, jobs, ctx, failed, logger)
            # VAE: lossless frames of every job; a job's clip is encoded on the CPU beside later decodes.
            _stage("decode", decode, jobs, ctx, failed, logger, then=watermark_when_decoded)
        # CPU: the watermarked H.264 clips still being encoded, published under the night's folder.
        clips = _collect("watermark", watermarking, failed, logger)
    except BaseException as exc:
        # Not a job's failure (those are caught per job) but the night's: record how it ended.
        runlog.finish_run(ctx.run_id, status="failed" if isinstance(exc, Exception) else "interrupted")
        raise
    runlog.finish_run(ctx.run_id, status="failed" if failed else "ok")
    logger.info("run %s: %d clip(s), %d failed job(s)", ctx.run_id, len(clips), len(failed))
    _publish_stage_table(runlog, ctx.run_id, logger)
    return {"run_id": ctx.run_id, "clips": clips, "failed": failed}


def _publish_stage_table(runlog: RunLog, run_id: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """The run's per-stage figures (those `t2v dashboard` charts) as a keyed Prefect table artifact."""
    try:
        create_table_artifact(
            key="nightly-stages",
            table=stage_table(runlog.run(run_id)),
            description=f"t2v run {run_id}: wall time and peak memory per job and stage",
        )
    except Exception as exc:
        # The clips and the run log are the night's results; a figure table the server did not
        # take is worth a warning, not a failed night.
        logger.warning("could not publish the stage table artifact: %s", exc)


def _stage(
    name: str,
    stage: Task[[JobSpec, RunContext], str],
    jobs: tuple[JobSpec, ...],
    ctx: RunContext,
    failed: dict[str, str],
    logger: logging.Logger | logging.LoggerAdapter,
    then: Callable[[JobSpec], None] | None = None,
) -> dict[str, str]:
    """Run one stage task for every job that has not failed yet, all submitted at once, and wait for
    them: the runner lets one at a time compute on the card and writes each output after letting go of
    it, so a job's write overlaps the next job's compute. Failures go to `failed`; `then(job)` is called
    as each job's task succeeds."""
    futures = {stage.submit(job, ctx): job for job in jobs if job.template not in failed}
    return _collect(name, futures, failed, logger, then)


def _collect(
    name: str,
    futures: dict[PrefectFuture, JobSpec],
    failed: dict[str, str],
    logger: logging.Logger | logging.LoggerAdapter,
    then: Callable[[JobSpec], None] | None = None,
) -> dict[str, str]:
    """Results of submitted stage tasks by template, in the order they were submitted; failures go to
    `failed`; `then(job)` is called as each succeeds."""
    done: dict[str, str] = {}
    for future in tqdm(as_completed(list(futures)), total=len(futures), desc=name, unit="job"):
        job = futures[future]
        try:
            done[job.template] = future.result()
        except Exception as exc:
            _failed(name, job, exc, failed, logger)
        else:
            logger.info("%s %s: %s", name, job.template, done[job.template])
            if then is not None:
                then(job)
    order = {job.template: i for i, job in enumerate(futures.values())}
    return dict(sorted(done.items(), key=lambda item: order[item[0]]))


def _failed(
    name: str,
    job: JobSpec,
    exc: Exception,
    failed: dict[str, str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> None:
    failed[job.template] = f"{name}: {type(exc).__name__}: {exc}"
    logger.error("%s %s: failed, skipping its later stages: %s", name, job.template, exc)
