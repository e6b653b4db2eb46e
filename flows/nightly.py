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

from prefect import flow, get_run_logger
from tqdm.auto import tqdm

from t2v.context import RunContext, check_jobs, data_dir, open_runlog, runlog_url
from t2v.jobs import Catalogue, JobSpec
from t2v.models.registry import resolve_model
from t2v.settings import get_settings
from t2v.store import Store
from tasks.stages import decode, diffuse, encode, watermark


@flow(name="nightly")
def nightly(catalogue: str = "data/templates.toml", model: str = "tiny", fp8_storage: bool = False) -> dict:
    """Make a clip for every template in `catalogue`; returns {run_id, clips, failed}."""
    logger = get_run_logger()
    settings = get_settings()
    ref = resolve_model(model)
    jobs = Catalogue.from_file(catalogue, ref.rules).jobs
    check_jobs(jobs, ref, catalogue=catalogue)
    root = data_dir(settings)
    url = runlog_url(settings)
    runlog = open_runlog(url)
    runlog.mark_interrupted()
    Store(root / "store").sweep_partials()
    run_id = runlog.start_run(
        kind="nightly", model=ref.source or ref.spec, catalogue=str(Path(catalogue).resolve())
    )
    ctx = RunContext(
        run_id=run_id,
        model=model,
        data_dir=root,
        outputs_dir=root / "outputs" / date.today().isoformat(),
        database_url=url,
        fp8_storage=fp8_storage,
    )
    logger.info("run %s: %d job(s) from %s on model %s", run_id, len(jobs), catalogue, ref.identity)

    failed: dict[str, str] = {}
    try:
        # Text encoder: embeddings of every prompt.
        _stage("encode", encode, jobs, ctx, failed, logger)
        # Transformer: denoised latents of every job.
        _stage("diffuse", diffuse, jobs, ctx, failed, logger)
        # VAE: lossless frames of every job.
        _stage("decode", decode, jobs, ctx, failed, logger)
        # CPU: watermarked H.264 clips, published under the night's outputs folder.
        clips = _stage("watermark", watermark, jobs, ctx, failed, logger)
    except BaseException as exc:
        # Not a job's failure (those are caught per job) but the night's: record how it ended.
        runlog.finish_run(run_id, status="failed" if isinstance(exc, Exception) else "interrupted")
        raise
    runlog.finish_run(run_id, status="failed" if failed else "ok")
    logger.info("run %s: %d clip(s), %d failed job(s)", run_id, len(clips), len(failed))
    return {"run_id": run_id, "clips": clips, "failed": failed}


def _stage(
    name: str,
    stage: Callable[[JobSpec, RunContext], str],
    jobs: tuple[JobSpec, ...],
    ctx: RunContext,
    failed: dict[str, str],
    logger: logging.Logger | logging.LoggerAdapter,
) -> dict[str, str]:
    """Run one stage task for every job that has not failed yet; a failure is recorded in `failed`."""
    done: dict[str, str] = {}
    pending = [job for job in jobs if job.template not in failed]
    for job in tqdm(pending, desc=name, unit="job"):
        try:
            done[job.template] = stage(job, ctx)
        except Exception as exc:
            failed[job.template] = f"{name}: {type(exc).__name__}: {exc}"
            logger.error("%s %s: failed, skipping its later stages: %s", name, job.template, exc)
        else:
            logger.info("%s %s: %s", name, job.template, done[job.template])
    return done
