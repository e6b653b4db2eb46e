"""Checks made before any flow starts, in the order docs/bad_input.md gives: settings (each command reads
`Settings.from_env()` once), model, job or catalogue, the clip's path, run log, Prefect API.

The model registry pulls in torch, the run log SQLAlchemy and the API check Prefect: each is imported in
the function that needs it, so that importing the CLI (and `--help`) stays fast.
"""

from __future__ import annotations

import filecmp
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from t2v.errors import InvalidInput, T2VError
from t2v.settings import Settings

if TYPE_CHECKING:
    from t2v.jobs import JobSpec
    from t2v.models.registry import ModelRef
    from t2v.runlog import RunLog


def resolve_model(model: str) -> ModelRef:
    """The `--model` value as a ModelRef; raises ModelNotFound. Reads no weights."""
    from t2v.models.registry import resolve_model as resolve

    return resolve(model)


def check_catalogue(path: str, ref: ModelRef, settings: Settings | None = None, *, fp8: bool = False) -> None:
    """Every template of the catalogue at `path`, prompt token counts included, and (with `settings`)
    that the night fits the card and host budgets; raises InvalidInput or NoPlanFits."""
    from t2v.context import check_budgets, check_jobs
    from t2v.jobs import Catalogue

    catalogue = Catalogue.from_file(path, ref.rules)
    check_jobs(catalogue.jobs, ref, catalogue=path)
    if settings is not None:
        check_budgets(catalogue.jobs, ref, settings, fp8=fp8)


def open_runlog(settings: Settings, *, create: bool = False) -> RunLog | UnmadeRunLog:
    """The run log, opened now so that an unreachable database stops the command.

    Only the commands that write to it (generate, nightly, rerun) pass `create`: the others (runs,
    dashboard) run from any folder, and a SQLite file that is not there yet is read as an empty log
    rather than made, with its folder, wherever they happen to run.
    """
    from t2v.context import open_runlog as open_cached

    url = settings.runlog_url
    if not create:
        path = _sqlite_file(url)
        if path is not None and not path.exists():
            return UnmadeRunLog(url, path)
    return open_cached(url)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases, in-memory ones, and URLs that do not parse
    (opening those gives the error that says what is wrong)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(database).expanduser()


class UnmadeRunLog:
    """A SQLite run log whose file no command has made yet, for the commands that only read it: it
    reads as empty, and as the real log once a run has created the file (a dashboard started first)."""

    def __init__(self, url: str, path: Path) -> None:
        self.url, self._path = url, path

    def _made(self) -> RunLog | None:
        from t2v.context import open_runlog as open_cached

        return open_cached(self.url) if self._path.exists() else None

    def mark_interrupted(self) -> int:
        log = self._made()
        return log.mark_interrupted() if log is not None else 0

    def runs(self, *, limit: int = 20) -> list[dict[str, Any]]:
        log = self._made()
        return log.runs(limit=limit) if log is not None else []

    def run(self, run_id: str) -> dict[str, Any]:
        from t2v.runlog import NoSuchRun

        log = self._made()
        if log is None:
            raise NoSuchRun(run_id)
        return log.run(run_id)

    def last_run_id(self, *, kind: str | tuple[str, ...] | None = None) -> str | None:
        log = self._made()
        return log.last_run_id(kind=kind) if log is not None else None

    def progress(self, run_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        log = self._made()
        return log.progress(run_ids) if log is not None else {run_id: [] for run_id in run_ids}

    def timeline(self, run_id: str) -> list[tuple]:
        log = self._made()
        return log.timeline(run_id) if log is not None else []


def check_out_path(out: str) -> Path:
    """`--out` as a path a clip can be published at: a file name ending in .mp4 that is not a folder,
    in a folder that exists or can be made, and is writable. Raises typer.BadParameter; makes nothing."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".mp4" or path.name.lower() == ".mp4":
        raise _bad_out(out, "must be a file name ending in .mp4")
    if path.is_dir():
        raise _bad_out(out, "must be a file, not a folder")
    if path.exists() and not path.is_file():
        raise _bad_out(out, "must be a regular file")
    # The nearest folder that exists: the ones missing below it are made when the clip is published.
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise _bad_out(out, f"cannot be made: '{folder}' is a file, not a folder")
    # The clip is renamed into place, so the folder's permission is what counts, not the file's.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _bad_out(out, f"cannot be written: the folder '{folder}' is not writable")
    return path


def _bad_out(out: str, rule: str) -> typer.BadParameter:
    return typer.BadParameter(f"{rule} but is {out!r}", param_hint="'--out'")


def clip_key(job: JobSpec, ref: ModelRef, *, fp8: bool) -> str:
    """The store key of the job's clip (its last stage's output), as the runner computes it."""
    from t2v.pipeline import JobKeys, KeyInputs, stages

    return JobKeys.of(stages(), KeyInputs(job, ref, fp8=fp8)).final


def check_overwrite(path: Path, stored: Path, *, force: bool, what: str = "`--out`") -> None:
    """Refuse to replace a file at `path` unless it is the clip to be made (`stored`, the store's copy,
    byte for byte) or `force`: a different clip, or any other file, is never replaced silently."""
    if force or not path.exists():
        return
    if stored.is_file() and filecmp.cmp(path, stored, shallow=False):
        return  # the same clip made again: publishing leaves it as it is
    raise InvalidInput(
        f"{what} '{path}' already exists and is not known to be this clip; pass --force to replace it, "
        "or choose another path."
    )


def check_prefect_api() -> None:
    """With PREFECT_API_URL set, the server must answer; without it Prefect starts a temporary one."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise T2VError(
            f"the Prefect API at PREFECT_API_URL={url} does not answer ({problem}); "
            "start it, or unset PREFECT_API_URL to run without a server."
        )


def template_name(prompt: str) -> str:
    """A template name for a one-off clip from the prompt's first words: 'a-red-fox-in-snow'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-")
    return slug or "clip"
