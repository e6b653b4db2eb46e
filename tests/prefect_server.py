"""What the slow tests against a real `prefect server start` share: their gate, a port, the environment.

Both tests run only with T2V_TEST_DEPLOYMENT=1 (`.ci/run` sets it); in CI without it they fail rather
than skip, so CI cannot hide them.
"""

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

FLAG = "T2V_TEST_DEPLOYMENT"
BIN = Path(sys.executable).parent
MIGRATED: list[Path] = []
"""An empty Prefect database at its schema's head, the session server's as it started (conftest.py):
a server started on a copy skips the ~16 s of migrations a new database costs on a 2-core machine."""


def seed_database(home: Path) -> None:
    """Put the migrated empty database where a server with PREFECT_HOME=`home` looks for its own."""
    home.mkdir(parents=True, exist_ok=True)
    if MIGRATED and not (home / "prefect.db").exists():
        shutil.copyfile(MIGRATED[0], home / "prefect.db")


def require_slow_tests(why_slow: str) -> None:
    """Skip (or, in CI, fail) unless the slow server tests are switched on."""
    if not os.environ.get(FLAG):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{FLAG} is not set; .ci/run must set it so CI runs the real-server tests")
        pytest.skip(f"slow ({why_slow}); set {FLAG}=1 to run it")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """This process's environment without Prefect's or t2v's settings, pointed at a server on `port`
    with its own PREFECT_HOME and the test's data folder; `extra` adds or overrides variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "T2V_"))}
    seed_database(tmp_path / "prefect")
    return env | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "T2V_DATA_DIR": str(tmp_path / "data"),
        **extra,
    }
