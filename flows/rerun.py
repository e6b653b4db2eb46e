"""Finish a failed or interrupted night: the same jobs, only the stages whose outputs are missing.

The night's jobs come from the run log (`runs.jobs_json`), not from the catalogue file, which may have
been edited since. Every stage whose output is in the store is skipped by the runner, so a stage that
finished in the original run is not computed again; the new run is logged with kind "rerun" and
`parent_run_id` pointing at the run it finishes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.nightly import clean_up_after_crashes, run_stages
from t2v.context import RunContext, check_jobs, data_dir, open_runlog, runlog_url
from t2v.models.registry import resolve_model
from t2v.plans import compile_pays
from t2v.rerun import night_to_rerun
from t2v.settings import get_settings


@flow(name="rerun")
def rerun(run_id: str | None = None) -> dict:
    """Finish the night of `run_id` (None: the newest nightly or rerun); returns {run_id, clips, failed}."""
    logger = get_run_logger()
    settings = get_settings()
    root = data_dir(settings)
    url = runlog_url(settings)
    runlog = open_runlog(url)
    # Before reading the run: a night killed minutes ago must read as interrupted, not running.
    clean_up_after_crashes(runlog, root)
    parent, night = night_to_rerun(runlog, run_id)
    # The model is recorded as a folder, hub id or "tiny": the same value `--model` took.
    ref = resolve_model(parent["model"])
    # The model folder or a watermark image may have changed since: check again before any work.
    check_jobs(night.jobs, ref)
    new_id = runlog.start_run(
        kind="rerun",
        model=parent["model"],
        catalogue=parent["catalogue"],
        parent_run_id=parent["id"],
        jobs_json=parent["jobs_json"],
    )
    ctx = RunContext(
        run_id=new_id,
        model=parent["model"],
        data_dir=root,
        outputs_dir=night.outputs_dir,
        database_url=url,
        fp8_storage=night.fp8_storage,
        compile_blocks=compile_pays((j.steps for j in night.jobs), settings.compile),
    )
    logger.info(
        "run %s: re-running %s, %d job(s) on model %s", new_id, parent["id"], len(night.jobs), ref.identity
    )
    return run_stages(night.jobs, ctx, runlog, logger) | {"parent_run_id": parent["id"]}
