"""Checks made before any flow starts, in the order docs/bad_input.md gives: settings (each command reads
`Settings.from_env()` once), model, job or catalogue, run log, Prefect API.

The model registry pulls in torch, the run log SQLAlchemy and the API check Prefect: each is imported in
the function that needs it, so that importing the CLI (and `--help`) stays fast.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from t2v.errors import T2VError
from t2v.settings import Settings

if TYPE_CHECKING:
    from t2v.models.registry import ModelRef
    from t2v.runlog import RunLog


def resolve_model(model: str) -> ModelRef:
    """The `--model` value as a ModelRef; raises ModelNotFound. Reads no weights."""
    from t2v.models.registry import resolve_model as resolve

    return resolve(model)


def check_catalogue(path: str, ref: ModelRef) -> None:
    """Every template of the catalogue at `path`, prompt token counts included; raises InvalidInput."""
    from t2v.context import check_jobs
    from t2v.jobs import Catalogue

    catalogue = Catalogue.from_file(path, ref.rules)
    check_jobs(catalogue.jobs, ref, catalogue=path)


def open_runlog(settings: Settings) -> RunLog:
    """The run log, opened (and created if new) now so that an unreachable database stops the command."""
    from t2v.context import open_runlog as open_cached

    return open_cached(settings.runlog_url)


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
