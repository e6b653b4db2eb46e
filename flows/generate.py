"""One clip from one prompt: a night of one job (flows/night.py), published under `generate/`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.night import run_stages
from t2v.context import check_budgets, check_jobs, start_run
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.settings import Settings
from t2v.store import publish


@flow(name="generate")
def generate(job: JobSpec, model: str = "tiny", out: str | None = None, fp8_storage: bool = False) -> str:
    """Make the clip of `job`; returns its path (`out`, else `<data_dir>/outputs/generate/<template>.mp4`)."""
    logger = get_run_logger()
    settings = Settings.from_env()
    ref = resolve_model(model)
    check_jobs([job], ref)
    check_budgets([job], ref, settings, fp8=fp8_storage)
    ctx = start_run(
        "generate",
        [job],
        settings=settings,
        model=model,
        outputs_dir=settings.outputs_dir / "generate",
        fp8_storage=fp8_storage,
    )
    logger.info("run %s: %s on model %s", ctx.run_id, job.template, model)
    summary = run_stages([job], ctx, logger, table=False)
    if summary["failed"]:
        raise RuntimeError(summary["failed"][job.template])
    clip = summary["clips"][job.template]
    if out is not None:
        clip = str(publish(Path(clip), Path(out).expanduser()))
    logger.info("run %s: %s", ctx.run_id, clip)
    return clip
