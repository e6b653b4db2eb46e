"""What one pipeline run hands to each of its stages, and the checks made before a run starts.

The flows build a `RunContext` and pass it to every stage task beside the job; both are small frozen
values, so they hash (the tasks keep one StageRunner per context) and read well in logs.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from t2v.errors import CatalogueError, InvalidInput
from t2v.jobs import JobSpec, template_line
from t2v.models import registry
from t2v.models.registry import ModelRef
from t2v.runlog import RunLog, sqlite_url
from t2v.settings import Settings


@dataclass(frozen=True)
class RunContext:
    """One run's identity and places: everything a stage needs besides its job."""

    run_id: str
    """Id of the run's row in the run log."""
    model: str
    """The `--model` value (`tiny`, a folder or a hub id); resolved again where it is used."""
    data_dir: Path
    """Root of the store and of the default run log."""
    outputs_dir: Path
    """Where the clips of this run are published as `<template>.mp4`."""
    database_url: str
    """SQLAlchemy URL of the run log."""
    fp8_storage: bool = False
    """Store the transformer's weights in float8 (opt-in: it changes the output; see docs/benchmarks.md)."""
    compile_blocks: bool = False
    """`torch.compile` the transformer's repeated blocks (on a GPU): `plans.compile_pays` decides."""

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"


def data_dir(settings: Settings) -> Path:
    """The data folder as an absolute path, so that nothing depends on a later working directory."""
    return settings.data_dir.expanduser().resolve()


def runlog_url(settings: Settings) -> str:
    """The run log URL: $T2V_DATABASE_URL, else an absolute SQLite path under the data folder."""
    return settings.database_url or sqlite_url(data_dir(settings) / "runlog.sqlite")


@functools.lru_cache(maxsize=8)
def open_runlog(url: str) -> RunLog:
    """One RunLog (one connection pool) per URL in this process; raises RunLogUnavailable."""
    return RunLog(url)


def check_jobs(jobs: Iterable[JobSpec], model: ModelRef, *, catalogue: Path | str | None = None) -> None:
    """Validate jobs against the model's rules, prompt token counts included; raises InvalidInput.

    Loads the tokenizer and no weights: this is what runs before a flow starts. With `catalogue`,
    messages say which template of which file is wrong.
    """
    jobs = list(jobs)
    tokenizer = None
    for job in jobs:
        try:
            job.validate(model.rules)
            tokenizer = tokenizer or registry.load_tokenizer(model)
            job.check_prompt_length(tokenizer, model.rules)
        except InvalidInput as exc:
            if catalogue is None:
                raise
            where = f"{catalogue}: template {job.template!r}"
            try:  # the line, as Catalogue.from_file gives it for the rules it checks itself
                line = template_line(Path(catalogue).read_text(encoding="utf-8"), job.template)
            except (OSError, UnicodeDecodeError):
                line = 0
            if line:
                where = f"{catalogue}:{line}: template {job.template!r}"
            raise CatalogueError(f"{where}: {exc}") from exc
