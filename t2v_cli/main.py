"""`t2v generate`, `t2v nightly` and `t2v runs`.

Each command checks everything it can without weights (the job or catalogue, the model, prompt token
counts, the run log) and only then starts a Prefect flow; a failed check is one line on stderr and
exit status 2. The flows, and with them the stage tasks, are imported only once the checks pass.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from t2v.context import check_jobs, open_runlog, runlog_url
from t2v.errors import InvalidInput, T2VError
from t2v.jobs import Catalogue, JobSpec
from t2v.media import Watermark
from t2v.models.registry import ModelRef, resolve_model
from t2v.models.wan22 import DEFAULT_NEGATIVE_PROMPT
from t2v.plans import compile_pays
from t2v.runlog import RunLog
from t2v.settings import Settings, get_settings

USAGE_ERROR = 2
RUN_FAILED = 1

# The click that typer parses with: recent typer releases vendor their own copy, older ones use click.
_click_errors = sys.modules[typer.BadParameter.__module__]
ClickException: type[Exception] = _click_errors.ClickException
UsageError: type[Exception] = _click_errors.UsageError
# `t2v` alone: click shows the help and exits 2 (a usage error that is not a mistake to put on one line);
# click releases before 8.2 print the help without raising.
_no_args = getattr(_click_errors, "NoArgsIsHelpError", None)
NoArgsIsHelp: tuple[type[Exception], ...] = (_no_args,) if _no_args else ()


def _fail(message: object, code: int) -> NoReturn:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    typer.echo(f"error: {' '.join(lines)}", err=True)
    raise SystemExit(code)


class _OneLineErrors(TyperGroup):
    """Reports bad input as `error: ...` and exit status 2, instead of a usage box or a traceback."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except T2VError as exc:
            _fail(exc, USAGE_ERROR)
        except NoArgsIsHelp as exc:
            exc.show()
            raise SystemExit(USAGE_ERROR) from None
        except UsageError as exc:  # typer.BadParameter among them
            _fail(exc.format_message(), USAGE_ERROR)
        except ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except typer.Abort:
            _fail("aborted", 130)
        code = rv if isinstance(rv, int) else 0  # without standalone mode, typer.Exit comes back as its code
        if not standalone_mode:
            return code
        raise SystemExit(code)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Text-to-video clips with Wan2.2 TI2V-5B, one at a time or a nightly batch.\n\n"
    "Example:\n\n    t2v nightly --catalogue data/templates.toml --model tiny",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    # Plain tracebacks: rich ones print local variables, the run log URL and its password among them.
    pretty_exceptions_enable=False,
)

Fp8Option = Annotated[
    bool,
    typer.Option(
        "--fp8-storage",
        help="Keep the transformer's weights in float8 and compute in bf16: less VRAM and PCIe traffic, "
        "but the clip changes (latents ~5% off after 3 steps on random weights). Off by default.",
    ),
]
ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="'tiny' (built in, random weights), a Wan2.2-TI2V-5B diffusers folder, "
        "or a hub id such as Wan-AI/Wan2.2-TI2V-5B-Diffusers.",
    ),
]


# --- checks made before any flow starts ----------------------------------------------------------


def _settings() -> Settings:
    try:
        settings = get_settings()
    except ValueError as exc:
        raise InvalidInput(f"`T2V_VRAM_BUDGET_GB` must be a number of GiB ({exc}).") from exc
    if settings.vram_budget_gib is not None and settings.vram_budget_gib <= 0:
        raise InvalidInput(f"`T2V_VRAM_BUDGET_GB` must be positive but is {settings.vram_budget_gib}.")
    compile_pays([], settings.compile)  # raises for a value other than auto, on or off
    return settings


def _runlog(settings: Settings) -> RunLog:
    """The run log, opened (and created if new) now so that an unreachable database stops the command."""
    return open_runlog(runlog_url(settings))


def _check_prefect_api() -> None:
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


def _template_name(prompt: str) -> str:
    """A template name for a one-off clip from the prompt's first words: 'a-red-fox-in-snow'."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-")
    return slug or "clip"


# --- commands ------------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What the clip shows.", show_default=False)],
    model: ModelOption = "tiny",
    height: Annotated[int, typer.Option(help="Pixels; a multiple of 32 up to 1280.")] = 480,
    width: Annotated[int, typer.Option(help="Pixels; a multiple of 32 up to 1280.")] = 832,
    frames: Annotated[int, typer.Option(help="4k+1 frames, at most 121.")] = 81,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Same seed, same clip, on any device.")] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance; <= 1 turns it off.")] = 5.0,
    fps: Annotated[int, typer.Option(help="Frames per second of the MP4.")] = 24,
    negative_prompt: Annotated[
        str, typer.Option(help="What the clip should not show.")
    ] = DEFAULT_NEGATIVE_PROMPT,
    watermark_text: Annotated[str, typer.Option(help="Text stamped in the bottom-right corner.")] = "t2v",
    out: Annotated[
        str | None,
        typer.Option(help="Where to put the MP4 [default: <data dir>/outputs/generate/<prompt words>.mp4]."),
    ] = None,
    fp8_storage: Fp8Option = False,
) -> None:
    """Make one clip from a prompt and print its path.

    Example:

    \b
        t2v generate "a red fox running through snow" --height 64 --width 96 --frames 9 --steps 4
    """
    settings = _settings()
    ref = resolve_model(model)
    job = JobSpec(
        template=_template_name(prompt),
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        height=height,
        width=width,
        frames=frames,
        steps=steps,
        guidance=guidance,
        fps=fps,
        watermark=Watermark(text=watermark_text),
    )
    check_jobs([job], ref)
    if out is not None and Path(out).suffix.lower() != ".mp4":
        raise typer.BadParameter(f"must be a file name ending in .mp4 but is {out!r}", param_hint="'--out'")
    _runlog(settings)
    _check_prefect_api()

    from flows.generate import generate as generate_flow

    try:
        clip = generate_flow(job, model=model, out=out, fp8_storage=fp8_storage)
    except Exception as exc:
        _fail(f"generate failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    typer.echo(clip)


@app.command()
def nightly(
    catalogue: Annotated[
        str, typer.Option(help="TOML file of [defaults] and [[template]] tables.")
    ] = "data/templates.toml",
    model: ModelOption = "tiny",
    fp8_storage: Fp8Option = False,
) -> None:
    """Make a clip for every template in the catalogue, stage by stage; exit 1 if any job failed.

    Clips go to <data dir>/outputs/<YYYY-MM-DD>/<template>.mp4; stages whose output is stored are skipped.

    Example:

        t2v nightly --catalogue data/templates.toml --model tiny
    """
    settings = _settings()
    _check_catalogue(catalogue, resolve_model(model))
    _runlog(settings)
    _check_prefect_api()

    from flows.nightly import nightly as nightly_flow

    try:
        summary = nightly_flow(catalogue=catalogue, model=model, fp8_storage=fp8_storage)
    except Exception as exc:
        _fail(f"nightly failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    clips, failed = summary["clips"], summary["failed"]
    typer.echo(f"run {summary['run_id']}: {len(clips)} clip(s), {len(failed)} failed")
    for template, path in clips.items():
        typer.echo(f"  ok      {template}  {path}")
    for template, error in failed.items():
        typer.echo(f"  failed  {template}  {error}")
    if failed:
        raise typer.Exit(RUN_FAILED)


def _check_catalogue(path: str, ref: ModelRef) -> None:
    catalogue = Catalogue.from_file(path, ref.rules)
    check_jobs(catalogue.jobs, ref, catalogue=path)


@app.command()
def rerun(
    run_id: Annotated[
        str | None, typer.Argument(metavar="RUN_ID", help="The run to finish.", show_default=False)
    ] = None,
    last: Annotated[bool, typer.Option("--last", help="Finish the newest nightly run (or re-run).")] = False,
) -> None:
    """Finish a failed or interrupted night: only stages whose outputs are missing run; exit 1 if a job fails.

    The night's jobs come from the run log, as they were when the night started, not from the catalogue
    file; the new run is logged as kind "rerun" with the original as its parent.

    Example:

        t2v rerun --last
    """
    from t2v.rerun import AlreadyDone, night_to_rerun
    from t2v.runlog import NoSuchRun

    if (run_id is None) == (not last):
        raise typer.BadParameter("give a RUN_ID or --last, not both and not neither", param_hint="'RUN_ID'")
    settings = _settings()
    runlog = _runlog(settings)
    runlog.mark_interrupted()  # a night killed a minute ago is "interrupted", not "running"
    try:
        parent, night = night_to_rerun(runlog, run_id)
    except NoSuchRun as exc:
        raise InvalidInput(f"no run {run_id!r} in the run log at {runlog.url}; see `t2v runs`.") from exc
    except AlreadyDone as exc:
        typer.echo(str(exc))
        return
    check_jobs(night.jobs, resolve_model(parent["model"]))
    _check_prefect_api()

    from flows.rerun import rerun as rerun_flow

    try:
        summary = rerun_flow(run_id=parent["id"])
    except Exception as exc:
        _fail(f"rerun failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    clips, failed = summary["clips"], summary["failed"]
    typer.echo(
        f"run {summary['run_id']} (re-run of {parent['id']}): {len(clips)} clip(s), {len(failed)} failed"
    )
    for template, path in clips.items():
        typer.echo(f"  ok      {template}  {path}")
    for template, error in failed.items():
        typer.echo(f"  failed  {template}  {error}")
    if failed:
        raise typer.Exit(RUN_FAILED)


@app.command()
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
    runlog = _runlog(_settings())
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
            f"  {'template':<24} {'stage':<9} {'status':<11} {'plan':<28} {'wall s':>8} "
            f"{'vram GiB':>9} {'ram GiB':>8}"
        )
        for row in run["stages"]:
            typer.echo(
                f"  {row['template'][:24]:<24} {row['stage']:<9} {row['status']:<11} "
                f"{(row['plan'] or '-')[:28]:<28} {_num(row['wall_s'], 2):>8} "
                f"{_num(row['peak_reserved_gib'], 2):>9} {_num(row['peak_rss_gib'], 2):>8}"
            )
            if row["error"]:
                typer.echo(f"    {row['error'].splitlines()[0][:200]}")


@app.command()
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
    from t2v.context import data_dir
    from t2v.dashboard import Dashboard, make_server
    from t2v.store import Store

    settings = _settings()
    board = Dashboard(runlog=_runlog(settings), store=Store(data_dir(settings) / "store"), nights=nights)
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


@app.command()
def deploy(
    catalogue: Annotated[
        str, typer.Option(help="The catalogue the scheduled runs read (stored as an absolute path).")
    ] = "data/templates.toml",
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

    _check_catalogue(catalogue, resolve_model(model))
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
    _check_prefect_api()
    deployment_id = deploy_nightly(spec)
    typer.echo(
        f"deployment nightly/nightly ({deployment_id}): '{spec.cron}' in {spec.timezone}, pool {spec.pool}"
    )
    typer.echo(f"start its worker on the GPU host: {spec.worker_command}")


def _time(iso: str | None) -> str:
    return iso[:19].replace("T", " ") if iso else "-"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":  # python -m t2v_cli.main
    sys.exit(app())
