"""`t2v deploy`: the nightly schedule on a Prefect server.

Prefect and `deployments` are imported inside the command, so `--help` stays fast. It reads no t2v
settings: the scheduled nights run in the worker's environment, which is the one that must be right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from t2v.errors import T2VError
from t2v_cli.checks import check_catalogue, check_prefect_api, resolve_model
from t2v_cli.options import DEFAULT_CATALOGUE, ModelOption


def deploy(
    catalogue: Annotated[
        str, typer.Option(help="The catalogue the scheduled runs read (stored as an absolute path).")
    ] = DEFAULT_CATALOGUE,
    model: ModelOption = "tiny",
    cron: Annotated[str, typer.Option(help="When the nightly run starts, in `--timezone`.")] = "0 2 * * *",
    timezone: Annotated[
        str | None, typer.Option(help="IANA time zone of the schedule [default: this host's].")
    ] = None,
    pool: Annotated[
        str | None, typer.Option(help="Process work pool to create or update [default: gpu-<hostname>].")
    ] = None,
    gpus: Annotated[
        int,
        typer.Option(
            min=1,
            help="GPU workers on the pool (one per GPU): the slots of the `gpu` concurrency limit; "
            "above 1 each night is split into that many shards, one flow run per worker.",
        ),
    ] = 1,
) -> None:
    """Set up the nightly schedule on the Prefect server at PREFECT_API_URL: pool, GPU limit, deployment.

    Then start a worker for the pool on the GPU host (the command is printed).

    Example:

    \b
        PREFECT_API_URL=http://127.0.0.1:4200/api t2v deploy --cron "0 2 * * *" --timezone Europe/Berlin
    """
    from prefect.settings import PREFECT_API_URL

    from deployments.deploy import NightlyDeployment
    from deployments.deploy import deploy as deploy_nightly

    check_catalogue(catalogue, resolve_model(model))
    options = {"timezone": timezone, "pool": pool}
    spec = NightlyDeployment(
        catalogue=Path(catalogue),
        model=model,
        cron=cron,
        gpus=gpus,
        **{k: v for k, v in options.items() if v},
    )
    if not PREFECT_API_URL.value():
        raise T2VError(
            "PREFECT_API_URL is not set; start a server (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api."
        )
    check_prefect_api()
    deployment_id = deploy_nightly(spec)
    typer.echo(
        f"deployment nightly/nightly ({deployment_id}): '{spec.cron}' in {spec.timezone}, pool {spec.pool}"
    )
    typer.echo(f"start its worker on the GPU host: {spec.worker_command}")
