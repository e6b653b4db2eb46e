"""What a night was, kept on its run so that `t2v rerun` can finish exactly that night later.

The catalogue may have been edited, moved or deleted by the time a failed night is re-run, so the run
log keeps the night's validated job specs as JSON (`runs.jobs_json`), with the outputs folder and the
fp8 switch (both change where clips go or which store keys the stages have). A re-run reads them back,
never the catalogue file; the store then skips every stage whose output exists, so only what is missing
is computed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2v.errors import T2VError
from t2v.jobs import JobSpec
from t2v.media import Watermark

if TYPE_CHECKING:  # annotations only: importing this module loads neither SQLAlchemy nor torch
    from t2v.models.registry import ModelRef
    from t2v.runlog import RunLog

RERUNNABLE_KINDS = ("nightly", "rerun")
"""Runs that record their night; a one-off `generate` is simply run again."""

_FORMAT = 1


class NothingToRerun(T2VError):
    """The run asked for cannot be re-run; the message says why."""


class AlreadyDone(NothingToRerun):
    """The run asked for finished ok: there is nothing to re-run (not an error for the CLI)."""


@dataclass(frozen=True)
class Night:
    """A night's work as the run saw it: its jobs, where its clips go, and the fp8 switch."""

    jobs: tuple[JobSpec, ...]
    outputs_dir: Path
    """The original night's outputs folder: a re-run a day later still completes that night's folder."""
    fp8_storage: bool = False

    def to_json(self) -> str:
        jobs = []
        for job in self.jobs:
            raw = asdict(job)
            image = raw["watermark"]["image"]
            raw["watermark"]["image"] = str(image) if image is not None else None
            jobs.append(raw)
        return json.dumps(
            {
                "format": _FORMAT,
                "outputs_dir": str(self.outputs_dir),
                "fp8_storage": self.fp8_storage,
                "jobs": jobs,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Night:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown night format {data.get('format')!r}")
        return cls(
            jobs=tuple(_job(raw) for raw in data["jobs"]),
            outputs_dir=Path(data["outputs_dir"]),
            fp8_storage=bool(data["fp8_storage"]),
        )


def _job(raw: dict[str, Any]) -> JobSpec:
    watermark = dict(raw.pop("watermark"))
    if watermark.get("image") is not None:
        watermark["image"] = Path(watermark["image"])
    return replace(JobSpec(**raw), watermark=Watermark(**watermark))


def night_to_rerun(runlog: RunLog, run_id: str | None) -> tuple[dict[str, Any], Night]:
    """The run (`None`: the newest nightly or rerun) and its night; raises NothingToRerun or NoSuchRun.

    Call `runlog.mark_interrupted()` first, so that a killed night reads as interrupted, not running.
    """
    if run_id is None:
        run_id = runlog.last_run_id(kind=RERUNNABLE_KINDS)
        if run_id is None:
            raise NothingToRerun("no nightly run in the run log yet; run `t2v nightly` first.")
    run = runlog.run(run_id)
    if run["kind"] not in RERUNNABLE_KINDS:
        raise NothingToRerun(
            f"run {run_id} is a {run['kind']} run; only nightly runs (and re-runs of them) can be re-run."
        )
    if run["status"] == "running":
        raise NothingToRerun(
            f"run {run_id} is still running (pid {run['pid']} on {run['host']}); wait for it to end."
        )
    if run["status"] == "ok":
        raise AlreadyDone(f"run {run_id} finished ok; nothing to re-run.")
    if not run.get("jobs_json"):
        raise NothingToRerun(
            f"run {run_id} was logged by an older t2v that kept no job specs; "
            f"run `t2v nightly --catalogue {run['catalogue'] or 'PATH'}` again instead "
            "(finished stages are skipped)."
        )
    return run, Night.from_json(run["jobs_json"])


@dataclass(frozen=True)
class Rerun:
    """A night checked and ready to finish: what `t2v rerun` and the rerun flow both start from."""

    parent: dict[str, Any]
    """The run being finished, as `RunLog.run` gives it (its stage rows included)."""
    night: Night
    model: ModelRef
    """The parent's `--model` value resolved again: the folder or hub id may have changed since."""


def prepare_rerun(runlog: RunLog, run_id: str | None) -> Rerun:
    """Check that the run (`None`: the newest nightly or rerun) can be finished now, without weights.

    Raises NoSuchRun (no such id), AlreadyDone (it finished ok), NothingToRerun (it cannot be re-run),
    ModelNotFound or InvalidInput (its model or jobs no longer pass the checks a new night would).
    """
    # Imported here: t2v.context imports the registry (torch) and the run log, and flows/nightly.py
    # imports this module for `Night`; at the top they would make this module heavy and cycle-prone.
    from t2v.context import check_jobs
    from t2v.models.registry import resolve_model

    # Before reading the run: a night killed a minute ago must read as interrupted, not as running.
    runlog.mark_interrupted()
    parent, night = night_to_rerun(runlog, run_id)
    # The model is recorded as a folder, hub id or "tiny": the same value `--model` took.
    model = resolve_model(parent["model"])
    # The model folder or a watermark image may have changed since the night: check again before any work.
    check_jobs(night.jobs, model)
    return Rerun(parent=parent, night=night, model=model)
