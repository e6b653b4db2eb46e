"""Shared fixtures: one Prefect test server for the whole session, a throw-away data folder, the tiny
model's components."""

import os

# Before Prefect is imported: no client telemetry, and none from the test server (it ignores DO_NOT_TRACK).
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and database for every flow of the session (it takes ~25 s to start);
    a copy of its database as it started is the one the tests' own servers start from."""
    import sqlite3
    from contextlib import closing

    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
    from prefect_server import MIGRATED

    with prefect_test_harness(server_startup_timeout=120):
        source = PREFECT_API_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]
        copy = tmp_path_factory.mktemp("prefect-db") / "prefect.db"
        with closing(sqlite3.connect(source)) as live, closing(sqlite3.connect(copy)) as target:
            live.backup(target)  # a consistent copy of a database in use (its WAL included)
        MIGRATED.append(copy)
        yield


@pytest.fixture(scope="module")
def parts() -> dict:
    """The tiny model's components, built once per test module (a module's tests may add hooks or
    adapters to them; another module gets its own)."""
    from t2v.models import tiny

    return dict(
        tokenizer=tiny.build_tokenizer(),
        text_encoder=tiny.build_text_encoder(),
        transformer=tiny.build_transformer(),
        vae=tiny.build_vae(),
    )


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """T2V_DATA_DIR in tmp_path (not created), with the other T2V_* settings cleared."""
    root = tmp_path / "data"
    monkeypatch.setenv("T2V_DATA_DIR", str(root))
    for name in ("T2V_DATABASE_URL", "T2V_INJECT_OOM", "T2V_VRAM_BUDGET_GB"):
        monkeypatch.delenv(name, raising=False)
    return root


TINY = {"height": 64, "width": 96, "frames": 9, "steps": 2}
"""Job settings small enough for the built-in model to make a clip in about a second on a CPU."""


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


@pytest.fixture
def write_catalogue(tmp_path: Path) -> Callable[..., Path]:
    """Write a catalogue of `TINY` defaults and the given templates; returns its path."""

    def write(*templates: dict[str, object], **defaults: object) -> Path:
        lines = ["[defaults]", *(f"{k} = {_toml(v)}" for k, v in (TINY | defaults).items())]
        for template in templates:
            lines += ["", "[[template]]", *(f"{k} = {_toml(v)}" for k, v in template.items())]
        path = tmp_path / "templates.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write
