"""The `t2v` command line: the entry point `t2v_cli.main:app` (pyproject.toml) and `python -m t2v_cli.main`.

The commands live in t2v_cli.clips (generate, nightly, rerun), t2v_cli.history (runs, dashboard) and
t2v_cli.deploy. None of them imports torch, diffusers, Prefect or SQLAlchemy before its body runs, so
`t2v --help` answers at once; tests/test_cli_imports.py keeps it that way.
"""

from __future__ import annotations

import sys

from t2v_cli.app import make_app
from t2v_cli.clips import generate, nightly, rerun
from t2v_cli.deploy import deploy
from t2v_cli.history import dashboard, runs

# Built here rather than in t2v_cli.app so that `python -m t2v_cli.main`, which runs this file as
# `__main__` beside any import of `t2v_cli.main`, adds the commands to its own app and not twice to one.
app = make_app()
# In this order in `t2v --help`: making clips first, then looking at them, then scheduling.
for command in (generate, nightly, rerun, runs, dashboard, deploy):
    app.command()(command)


if __name__ == "__main__":  # python -m t2v_cli.main
    sys.exit(app())
