"""One clip from one prompt: the four stages of a single job, in order."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from t2v.context import RunContext, check_jobs, data_dir, open_runlog, runlog_url
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.plans import compile_pays
from t2v.settings import get_settings
from t2v.store import publish
from tasks.stages import decode, diffuse, encode, gpu_slot, prefetch, watermark


@flow(name="generate")
def generate(job: JobSpec, model: str = "tiny", out: str | None = None, fp8_storage: bool = False) -> str:
    """Make the clip of `job`; returns its path (`out`, else `<data_dir>/outputs/generate/<template>.mp4`)."""
    logger = get_run_logger()
    settings = get_settings()
    ref = resolve_model(model)
    check_jobs([job], ref)
    root = data_dir(settings)
    url = runlog_url(settings)
    runlog = open_runlog(url)
    run_id = runlog.start_run(kind="generate", model=ref.source or ref.spec)
    ctx = RunContext(
        run_id=run_id,
        model=model,
        data_dir=root,
        outputs_dir=root / "outputs" / "generate",
        database_url=url,
        fp8_storage=fp8_storage,
        compile_blocks=compile_pays([job.steps], settings.compile),
    )
    logger.info("run %s: %s on model %s", run_id, job.template, ref.identity)
    try:
        with gpu_slot():
            prefetch("text_encoder", [job], ctx)
            prefetch("transformer", [job], ctx)
            encode(job, ctx)
            prefetch("vae", [job], ctx)
            diffuse(job, ctx)
            decode(job, ctx)
        clip = watermark(job, ctx)
        if out is not None:
            clip = str(publish(Path(clip), Path(out).expanduser()))
    except BaseException as exc:
        runlog.finish_run(run_id, status="failed" if isinstance(exc, Exception) else "interrupted")
        raise
    runlog.finish_run(run_id, status="ok")
    logger.info("run %s: %s", run_id, clip)
    return clip
