"""`t2v deploy`: write the project's prefect.yaml from a few options and apply it with `prefect deploy`.

Prefect and `deployments` are imported inside the command, so `--help` stays fast. It reads no t2v
settings: the scheduled nights run in the worker's environment, which is the one that must be right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from t2v.errors import InvalidInput, T2VError
from t2v_cli.app import RUN_FAILED, fail
from t2v_cli.checks import check_catalogue, check_prefect_api, resolve_model

_KEEP = "[default: the file's]"


def deploy(
    catalogue: Annotated[
        str | None,
        typer.Option(help=f"The catalogue the scheduled runs read (kept relative to the checkout). {_KEEP}"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help=f"`tiny`, a diffusers folder on the GPU host, or a hub id. {_KEEP}")
    ] = None,
    cron: Annotated[
        str | None, typer.Option(help=f"When the nightly run starts, in `--timezone`. {_KEEP}")
    ] = None,
    timezone: Annotated[str | None, typer.Option(help=f"IANA time zone of the schedule. {_KEEP}")] = None,
    pool: Annotated[str | None, typer.Option(help=f"Process work pool of the GPU workers. {_KEEP}")] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="GPU workers on the pool (one per GPU): the slots of the `gpu` concurrency limit; "
            f"above 1 each night is split into that many shards, one flow run per worker. {_KEEP}",
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="The prefect.yaml to write and apply [default: the checkout's].")
    ] = None,
    write_only: Annotated[
        bool, typer.Option("--write-only", help="Write the file and stop (to review, diff or commit it).")
    ] = False,
) -> None:
    """Write prefect.yaml from these options, then apply it: the work pool, then `prefect deploy --all`.

    Options not given keep the file's values, so `t2v deploy` alone applies the file as it is. The same
    without t2v: `prefect work-pool create POOL --type process` once, then `prefect deploy --all`.

    Example:

    \b
        PREFECT_API_URL=http://127.0.0.1:4200/api t2v deploy --timezone America/New_York --gpus 2
    """
    from deployments import deploy as prefect_yaml

    path = (file or prefect_yaml.PREFECT_FILE).expanduser().absolute()
    if not path.parent.is_dir():
        raise InvalidInput(f"`--file` has to be in a folder that exists but {str(path)!r} is not.")
    given = {"model": model, "cron": cron, "timezone": timezone, "pool": pool, "gpus": gpus}
    if catalogue is not None:
        given["catalogue"] = prefect_yaml.catalogue_value(catalogue)
    values = prefect_yaml.values_in(path) | {k: v for k, v in given.items() if v is not None}
    spec = prefect_yaml.NightlyDeployment(**values)
    check_catalogue(str(spec.catalogue_path), resolve_model(spec.model))
    if not write_only:
        _check_server()
    path.write_text(prefect_yaml.render(spec))
    typer.echo(f"wrote {path}")
    if write_only:
        typer.echo(f"apply it with `prefect deploy --all --prefect-file {path}` (the pool {spec.pool} first)")
        return
    if prefect_yaml.ensure_pool(spec.pool):
        typer.echo(f"created process work pool {spec.pool}")
    try:
        deployment_id = prefect_yaml.apply(path)
    except prefect_yaml.DeployFailed as exc:
        fail(f"prefect deploy failed: {exc}", RUN_FAILED)
    shards = f", {spec.gpus} shards" if spec.gpus > 1 else ""
    typer.echo(
        f"deployment nightly/nightly ({deployment_id}): '{spec.cron}' in {spec.timezone}{shards}, "
        f"pool {spec.pool}"
    )
    typer.echo(f"start its worker on the GPU host: {spec.worker_command}")


def _check_server() -> None:
    """PREFECT_API_URL set and answering, before anything is written."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise T2VError(
            "PREFECT_API_URL is not set; start a server (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api, or pass --write-only."
        )
    check_prefect_api()
