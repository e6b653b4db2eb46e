"""Finish a failed or interrupted night: the same jobs, only the stages whose outputs are missing.

The night's jobs come from the run log (`runs.jobs_json`), not from the catalogue file, which may have
been edited since. Every stage whose output is in the store is skipped by the runner, so a stage that
finished in the original run is not computed again; the new run is logged with kind "rerun" and
`parent_run_id` pointing at the run it finishes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.night import run_stages
from flows.nightly import clean_up_after_crashes
from t2v.context import check_budgets, open_runlog, start_run
from t2v.rerun import prepare_rerun
from t2v.settings import Settings


@flow(name="rerun")
def rerun(run_id: str | None = None) -> dict:
    """Finish the night of `run_id` (None: the newest nightly or rerun); returns {run_id, clips, failed}."""
    logger = get_run_logger()
    settings = Settings.from_env()
    # Before reading the run: a night killed minutes ago must read as interrupted, not running.
    clean_up_after_crashes(settings)
    plan = prepare_rerun(open_runlog(settings.runlog_url), run_id)
    parent, night = plan.parent, plan.night
    check_budgets(night.jobs, plan.model, settings, fp8=night.fp8_storage)
    ctx = start_run(
        "rerun",
        night.jobs,
        settings=settings,
        # Recorded as a folder, hub id or "tiny": the same value `--model` took.
        model=parent["model"],
        outputs_dir=night.outputs_dir,
        fp8_storage=night.fp8_storage,
        catalogue=parent["catalogue"],
        parent_run_id=parent["id"],
        jobs_json=parent["jobs_json"],
    )
    logger.info(
        "run %s: re-running %s, %d job(s) on model %s",
        ctx.run_id,
        parent["id"],
        len(night.jobs),
        plan.model.identity,
    )
    return run_stages(night.jobs, ctx, logger) | {"parent_run_id": parent["id"]}
