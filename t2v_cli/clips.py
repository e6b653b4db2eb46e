"""`t2v generate`, `t2v nightly` and `t2v rerun`: the commands that make clips.

Each checks everything it can without weights (settings, model, job or catalogue with prompt token
counts, the run log, the Prefect API) and only then starts its Prefect flow; a failed check is one line
on stderr and exit status 2. The flows, and with them torch and Prefect, are imported only once the
checks pass, and the model registry and run log only inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from t2v.errors import InvalidInput
from t2v.jobs import JobSpec
from t2v.media import Watermark
from t2v.outputs import made_of
from t2v.post import MAX_TEXT_CHARS
from t2v.settings import Settings
from t2v_cli.app import RUN_FAILED, fail
from t2v_cli.checks import (
    check_catalogue,
    check_out_path,
    check_overwrite,
    check_prefect_api,
    clip_key,
    open_runlog,
    resolve_model,
    template_name,
)
from t2v_cli.options import (
    DEFAULT_CATALOGUE,
    CatalogueOption,
    ForceOption,
    Fp8Option,
    ModelOption,
    job_help,
    job_option,
)

_WATERMARK = Watermark()
"""The watermark a one-off clip gets besides its text: the defaults, which also give the option's."""


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help=job_help("prompt"), show_default=False)],
    model: ModelOption = "tiny",
    height: int = job_option("height"),
    width: int = job_option("width"),
    frames: int = job_option("frames"),
    steps: int = job_option("steps"),
    seed: int = job_option("seed"),
    guidance: float = job_option("guidance"),
    sampler: str | None = job_option("sampler"),
    timesteps_arg: Annotated[
        str | None, typer.Option("--timesteps", metavar="T1,T2,...", help=job_help("timesteps"))
    ] = None,
    fps: int = job_option("fps"),
    negative_prompt: str = job_option("negative_prompt"),
    image: str | None = job_option("image"),
    fit: str | None = job_option("fit"),
    # Text: a threshold or "mag[:THRESHOLD]", read into the field's float or str by `from_text`.
    step_cache: str = job_option("step_cache"),
    attention: str = job_option("attention"),
    watermark_text: Annotated[
        str,
        typer.Option(
            help=f"Text stamped in the {_WATERMARK.corner} corner: at most {MAX_TEXT_CHARS} ASCII "
            "letters, digits and punctuation (what the font can draw)."
        ),
    ] = _WATERMARK.text,
    # Not named after their JobSpec fields: these take the CLI's short forms (a comma list, a frame, a
    # format), which `t2v.outputs` reads into the fields' dataclasses.
    aspects: Annotated[
        str,
        typer.Option(
            "--outputs",
            help="The MP4s to make, comma-separated, the first being the clip: native (as made), 16:9, "
            "9:16, 1:1, 4:5; each published as <name>.<aspect>.mp4 beside it (native: <name>.mp4).",
        ),
    ] = "native",
    fill: str = job_option("fill"),
    focus: str = job_option("focus"),
    background: str = job_option("background"),
    poster_frame: Annotated[
        str | None,
        typer.Option(
            "--poster", help="Also a JPEG poster of one frame: first, middle, last or a frame index."
        ),
    ] = None,
    preview_format: Annotated[
        str | None,
        typer.Option(
            "--preview", help="Also a looping 320-pixel-wide preview at 12 fps: webp or gif (at most 5 MB)."
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Where to put the MP4 [default: <data dir>/outputs/generate/<prompt words>-<first 8 hex "
            "digits of the clip's store key>.mp4]."
        ),
    ] = None,
    lora_args: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            metavar="PATH[:SCALE]",
            help="A LoRA style (.safetensors, diffusers, ComfyUI, Kohya or musubi keys) at SCALE "
            "(default 1, -4 to 4); repeat for several.",
        ),
    ] = None,
    fp8_storage: Fp8Option = False,
    force: ForceOption = False,
) -> None:
    """Make one clip from a prompt and print its path.

    Each different clip gets its own default name; replacing a different file needs --force.

    Example:

    \b
        t2v generate "a red fox running through snow" --height 64 --width 96 --frames 9 --steps 4
        t2v generate "the fox looks up and the snow starts to fall" --image fox.jpg
        t2v generate "a fox in the snow" --lora styles/ink.safetensors:0.8
        t2v generate "a fox in the snow" --step-cache mag
        t2v generate "a fox in the snow" --model FOLDER --attention sage
        t2v generate "a fox in the snow" --model FOLDER --sampler dmd --timesteps 1000,757,522
    """
    from t2v import lora, samplers, step_caches
    from t2v.context import check_budgets, check_jobs

    settings = Settings.from_env()
    ref = resolve_model(model)
    job = JobSpec(
        template=template_name(prompt),
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        height=height,
        width=width,
        frames=frames,
        steps=steps,
        guidance=guidance,
        fps=fps,
        image=str(Path(image).expanduser().absolute()) if image else image,
        fit=fit,
        step_cache=step_caches.from_text(step_cache),
        attention=attention,
        watermark=Watermark(text=watermark_text),
        outputs=tuple(aspects.split(",")),
        fill=fill,
        focus=focus,
        background=background,
        poster=int(poster_frame) if poster_frame is not None and poster_frame.isdigit() else poster_frame,
        preview=preview_format,
        lora=tuple(lora.relative_to([lora.parse(a) for a in lora_args or ()], Path.cwd())),
        sampler=sampler,
        timesteps=timesteps_arg,
    )
    # The model folder's preset unless --sampler is given; an explicit --guidance with a sampler
    # that has none is refused, the default one turned off.
    given = ctx.get_parameter_source("guidance").name in ("COMMANDLINE", "ENVIRONMENT")
    job = samplers.resolve(job, ref.rules, guidance_given=given)
    check_jobs([job], ref)
    if job.image is not None:
        job = _sized_for_picture(ctx, job, ref)
        job.validate(ref.rules)  # again: the checks that depend on the size (the outputs')
    check_budgets([job], ref, settings, fp8=fp8_storage)
    # Named by its key, so two different clips of one prompt never share a file (the key leaves the
    # template out, so renaming the job keeps it); the finish stage publishes it under this name.
    key = clip_key(job, ref, fp8=fp8_storage)
    job = replace(job, template=f"{job.template}-{key[:8]}")
    # The clip is the first of its MP4s: `<name>.mp4` for the native one, `<name>.9x16.mp4`...
    default = settings.outputs_dir / "generate" / f"{job.template}{made_of(job)[0].tail}"
    path = check_out_path(out) if out is not None else check_out_path(str(default))
    stored = _stored_clip(job, ref, settings, fp8=fp8_storage)
    check_overwrite(path, stored, force=force, what="`--out`" if out is not None else "the clip's path")
    if path != default:  # published there too, on the way to --out
        check_overwrite(default, stored, force=force, what="the clip's default path")
    open_runlog(settings, create=True)
    check_prefect_api()

    from flows.generate import generate as generate_flow

    try:
        clip = generate_flow(job, model=model, out=out or str(default), fp8_storage=fp8_storage)
    except Exception as exc:
        fail(f"generate failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    typer.echo(clip)


def _stored_clip(job: JobSpec, ref: Any, settings: Settings, *, fp8: bool) -> Path:
    """Where the store keeps the job's clip (its first MP4): what a file at its path is compared with."""
    from t2v.pipeline import JobKeys, KeyInputs, finish, stages
    from t2v.store import Store

    keys = JobKeys.of(stages(), KeyInputs(job, ref, fp8=fp8))
    return finish.clip_file(Store(settings.store_dir), job, keys)


def _sized_for_picture(ctx: typer.Context, job: JobSpec, ref: Any) -> JobSpec:
    """The job's size from its picture, unless --height or --width was given (t2v.images)."""
    from t2v.images import size_for_picture

    given = any(
        ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT") for name in ("height", "width")
    )
    return size_for_picture(job, ref.rules, size_given=given)


def nightly(
    catalogue: CatalogueOption = DEFAULT_CATALOGUE,
    model: ModelOption = "tiny",
    fp8_storage: Fp8Option = False,
) -> None:
    """Make a clip for every template in the catalogue, stage by stage; exit 1 if any job failed.

    Clips go to <data dir>/outputs/<YYYY-MM-DD>/<template>.mp4; stages whose output is stored are skipped.

    Example:

        t2v nightly --catalogue data/templates.toml --model tiny
    """
    settings = Settings.from_env()
    check_catalogue(catalogue, resolve_model(model), settings, fp8=fp8_storage)
    open_runlog(settings, create=True)
    check_prefect_api()

    from flows.nightly import nightly as nightly_flow

    try:
        summary = nightly_flow(catalogue=catalogue, model=model, fp8_storage=fp8_storage)
    except Exception as exc:
        fail(f"nightly failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    _report(summary, f"run {summary['run_id']}")


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
    from t2v.rerun import AlreadyDone, prepare_rerun
    from t2v.runlog import NoSuchRun

    if (run_id is None) == (not last):
        raise typer.BadParameter("give a RUN_ID or --last, not both and not neither", param_hint="'RUN_ID'")
    settings = Settings.from_env()
    runlog = open_runlog(settings, create=True)
    try:
        prepared = prepare_rerun(runlog, run_id)
    except NoSuchRun as exc:
        raise InvalidInput(f"no run {run_id!r} in the run log at {runlog.url}; see `t2v runs`.") from exc
    except AlreadyDone as exc:  # nothing to do is not an error: exit 0
        typer.echo(str(exc))
        return
    check_prefect_api()

    from flows.rerun import rerun as rerun_flow

    parent_id = prepared.parent["id"]
    try:
        summary = rerun_flow(run_id=parent_id)
    except Exception as exc:
        fail(f"rerun failed: {type(exc).__name__}: {exc}", RUN_FAILED)
    _report(summary, f"run {summary['run_id']} (re-run of {parent_id})")


def _report(summary: dict[str, Any], headline: str) -> None:
    """A night's outcome, one line per clip; exit 1 if any job failed, so cron and CI notice."""
    clips, failed = summary["clips"], summary["failed"]
    typer.echo(f"{headline}: {len(clips)} clip(s), {len(failed)} failed")
    for template, path in clips.items():
        typer.echo(f"  ok      {template}  {path}")
    for template, error in failed.items():
        typer.echo(f"  failed  {template}  {error}")
    if failed:
        raise typer.Exit(RUN_FAILED)
