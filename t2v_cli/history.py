"""`t2v runs` and `t2v dashboard`: the run log, as text or as a web page.

SQLAlchemy (the run log) and the dashboard are imported inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from t2v.errors import T2VError
from t2v.settings import Settings
from t2v_cli.checks import open_runlog


def runs(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the runs with their stage rows as JSON.")
    ] = False,
    limit: Annotated[int, typer.Option(min=0, help="How many runs, newest first.")] = 10,
) -> None:
    """List the latest runs with a row per stage attempt: status, plan, wall time, peak memory.

    Example:

        t2v runs --limit 3
    """
    runlog = open_runlog(Settings.from_env())
    # Rows left "running" by a process that is gone (kill -9, OOM killer) are shown as interrupted.
    runlog.mark_interrupted()
    found = runlog.runs(limit=limit)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo("no runs yet")
        return
    for run in found:
        typer.echo(
            f"{run['id']}  {run['kind']}  {run['status']}  {_time(run['started'])}  {run['model']}"
            + (f"  {run['catalogue']}" if run["catalogue"] else "")
            + (f"  (re-run of {run['parent_run_id']})" if run["parent_run_id"] else "")
        )
        typer.echo(
            f"  {'template':<24} {'stage':<9} {'status':<11} {'plan':<48} {'wall s':>8} "
            f"{'vram GiB':>9} {'ram GiB':>8}"
        )
        for row in run["stages"]:
            typer.echo(
                f"  {row['template'][:24]:<24} {row['stage']:<9} {row['status']:<11} "
                f"{(row['plan'] or '-')[:48]:<48} {_num(row['wall_s'], 2):>8} "
                f"{_num(row['peak_reserved_gib'], 2):>9} {_num(row['peak_rss_gib'], 2):>8}"
            )
            if row["error"]:
                typer.echo(f"    {row['error'].splitlines()[0][:200]}")


def dashboard(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one.")] = 8765,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. The page has no login: keep it on loopback "
            "(reach it with `ssh -L 8765:127.0.0.1:8765 gpu-host`)."
        ),
    ] = "127.0.0.1",
    nights: Annotated[int, typer.Option(min=1, max=200, help="How many runs to list and chart.")] = 30,
) -> None:
    """Serve a web page of the run log: nights, stage time and peak memory, failures, playable clips.

    Example:

        t2v dashboard --port 8765
    """
    from t2v.dashboard import Dashboard, make_server
    from t2v.store import Store

    settings = Settings.from_env()
    board = Dashboard(runlog=open_runlog(settings), store=Store(settings.store_dir), nights=nights)
    try:
        server = make_server(board, host=host, port=port)
    except OSError as exc:
        raise T2VError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port.") from exc
    bound_host, bound_port = server.server_address[:2]
    typer.echo(f"dashboard at http://{bound_host}:{bound_port}/ (Ctrl+C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _time(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
