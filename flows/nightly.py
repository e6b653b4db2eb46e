"""The nightly batch: every template of the catalogue through the pipeline (flows/night.py)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from prefect import flow, get_run_logger

from flows.night import run_stages
from t2v.context import check_budgets, check_jobs, open_runlog, start_run
from t2v.jobs import Catalogue
from t2v.models.registry import resolve_model
from t2v.rerun import Night
from t2v.settings import Settings
from t2v.shards import select_shard
from t2v.store import Store, sweep_partials


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
    settings = Settings.from_env()
    ref = resolve_model(model)
    jobs = select_shard(Catalogue.from_file(catalogue, ref.rules).jobs, shard)
    check_jobs(jobs, ref, catalogue=catalogue)
    check_budgets(jobs, ref, settings, fp8=fp8_storage)
    clean_up_after_crashes(settings)
    night = Night(
        jobs=jobs, outputs_dir=settings.outputs_dir / date.today().isoformat(), fp8_storage=fp8_storage
    )
    ctx = start_run(
        "nightly",
        jobs,
        settings=settings,
        model=model,
        outputs_dir=night.outputs_dir,
        fp8_storage=fp8_storage,
        catalogue=str(Path(catalogue).resolve()),
        # The jobs as validated now: `t2v rerun` finishes this night even if the catalogue changes.
        jobs_json=night.to_json(),
    )
    logger.info("run %s: %d job(s) from %s on model %s", ctx.run_id, len(jobs), catalogue, ref.identity)
    return run_stages(jobs, ctx, logger)


def clean_up_after_crashes(settings: Settings) -> None:
    """Close run-log rows of dead processes and delete their temporary files, before a night starts."""
    open_runlog(settings.runlog_url).mark_interrupted()
    Store(settings.store_dir).sweep_partials()
    sweep_partials(settings.outputs_dir)
