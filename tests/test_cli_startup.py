"""What importing the CLI does, each in a fresh interpreter: no heavy imports, one allocator setting."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "diffusers", "sqlalchemy")
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
COMMANDS = ("generate", "nightly", "rerun", "runs", "dashboard", "deploy")


def _python(code: str, **env: str) -> str:
    """stdout of `python -c code` in the repo, without the variable unless given; fails on a non-zero exit."""
    environ = {k: v for k, v in os.environ.items() if k != ALLOC_CONF} | {"PYTHONPATH": str(REPO), **env}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_cli_imports_no_heavy_module():
    code = f"import sys, t2v_cli.main; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"

    assert ast.literal_eval(_python(code).strip()) == []


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)], ids=["t2v", *COMMANDS])
def test_help_imports_no_heavy_module(args):
    # standalone_mode=False: the app returns after printing the help instead of exiting, so the same
    # process can then say which modules printing it loaded (on the last line of stdout).
    code = (
        "import sys\n"
        "from t2v_cli.main import app\n"
        f"app([*{args!r}, '--help'], standalone_mode=False)\n"
        f"print(repr(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )

    out = _python(code).splitlines()

    assert "Example:" in "\n".join(out[:-1])
    assert ast.literal_eval(out[-1]) == []


def test_the_cli_gets_the_allocator_setting_of_the_library():
    code = f"import os, {{}}; print(os.environ[{ALLOC_CONF!r}])"

    library = _python(code.format("t2v")).strip()
    cli = _python(code.format("t2v_cli.main")).strip()

    assert "pinned_use_cuda_host_register:True" in library  # the full value, not a shorter one
    assert cli == library


def test_a_user_set_allocator_setting_is_kept():
    code = f"import os, t2v_cli.main; print(os.environ[{ALLOC_CONF!r}])"

    assert _python(code, **{ALLOC_CONF: "backend:cudaMallocAsync"}).strip() == "backend:cudaMallocAsync"
