"""Finish: the frames through each output's post steps into its files (the MP4 as made, other aspects, a
poster, a preview) in one ffmpeg run, each stored under a key of its own and published as
`<outputs_dir>/<template><tail>`: `fox.mp4`, `fox.9x16.mp4`, `fox.poster.jpg`, `fox.preview.webp`.

A job's outputs (`t2v.outputs.made_of`) are separate files in the store, each keyed by its own recipe
(its steps and encoding) and the frames' key, so adding an output to a template makes only that file:
the stored ones, and everything upstream, are skipped. The stage's key is the native MP4's own key
where a job asks for nothing else (as before outputs existed, so those stores stay valid); otherwise it
hashes every output's recipe, and a small manifest stored under it lists the files (what the dashboard
reads to show a clip's outputs from the run log's key).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from t2v.encodings import H264
from t2v.jobs import JobSpec
from t2v.media import Render, Watermark
from t2v.outputs import NATIVE, Made, is_default, made_of
from t2v.pipeline import decode
from t2v.pipeline.stage import JobKeys, KeyInputs, Stage, Work
from t2v.store import Store, make_key, publish

FOLDER = "watermark"
"""The stage's store folder and the name hashed into its keys: the stage was called "watermark" when
its first outputs were stored, and they keep their keys."""
FILE_TYPES = {".mp4": "video/mp4", ".jpg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif"}
"""Every suffix an output can have, with its media type: what the dashboard serves by key."""


@dataclass(frozen=True)
class Stored:
    """One output of a job as the store holds it."""

    made: Made
    kind: Stage
    key: str


def _watermark(watermark: Watermark) -> dict[str, object]:
    recipe = asdict(watermark)
    if watermark.image:
        # The image's bytes, not its path: the same file moved keeps the clip, an edited one does not.
        recipe["image"] = hashlib.sha256(Path(watermark.image).read_bytes()).hexdigest()
    return recipe


def _recipe(made: Made, job: JobSpec) -> dict[str, object]:
    """What an output's key hashes besides the frames' key: its steps and encoding."""
    if made.name == NATIVE:
        # The native MP4's recipe from before outputs existed, so that its stored files keep their keys.
        return dict(fps=job.fps, watermark=_watermark(job.watermark), max_bytes=made.encoding.max_bytes)
    steps = [
        {"step": step.name, **(_watermark(step) if isinstance(step, Watermark) else asdict(step))}
        for step in made.steps
    ]
    encoding = {"encoding": type(made.encoding).__name__, **asdict(made.encoding)}
    return dict(output=made.name, fps=job.fps, steps=steps, encoding=encoding)


def key(k: KeyInputs) -> dict[str, object]:
    made = made_of(k.job)
    if is_default(k.job):
        return _recipe(made[0], k.job)
    return dict(outputs=[_recipe(m, k.job) for m in made])


def stored(job: JobSpec, keys: JobKeys) -> list[Stored]:
    """The job's outputs in order (the clip first) with where the store keeps them."""
    # Keyed as JobKeys.of keys a stage: its store name, its recipe and its input's key by output name.
    frames = {decode.STAGE.output: keys[decode.STAGE]}
    return [
        Stored(made, kind(made.encoding.suffix), make_key(FOLDER, **_recipe(made, job), **frames))
        for made in made_of(job)
    ]


def kind(suffix: str) -> Stage:
    """The stage as the store's kind of a file of its with `suffix`: its folder, that suffix, and its name
    for the runner's hooks (a crash drill pausing at the stage pauses at any of its files)."""
    return STAGE if suffix == STAGE.suffix else replace(STAGE, suffix=suffix)


def files(work: Work) -> list[tuple[Stage, str]]:
    """Every file the stage's output is: its outputs and, for more than the native MP4, the manifest."""
    found = [(s.kind, s.key) for s in stored(work.job, work.keys)]
    return found if is_default(work.job) else [*found, (MANIFEST, work.key)]


def compute(work: Work) -> None:
    store = work.run.store
    outputs = stored(work.job, work.keys)
    missing = [s for s in outputs if not store.has(s.kind, s.key)]
    if missing:
        _make(work, missing)
    if not is_default(work.job) and not store.has(MANIFEST, work.key):
        manifest = [
            {"name": s.made.name, "key": s.key, "suffix": s.kind.suffix, "tail": s.made.tail} for s in outputs
        ]
        with store.writing(MANIFEST, work.key) as temp:
            temp.write_text(json.dumps({"outputs": manifest}, indent=1))


def _make(work: Work, missing: list[Stored]) -> None:
    """The missing outputs in one ffmpeg run, each renamed into the store only if all of them were made."""
    source, codec, fps = work.input_path(decode.STAGE), work.run.codec, work.job.fps
    with ExitStack() as stack:
        temps = [stack.enter_context(work.run.store.writing(s.kind, s.key)) for s in missing]
        first = missing[0].made
        if len(missing) == 1 and isinstance(first.encoding, H264):
            # One MP4 (every job before outputs existed): the codec's `encode_clip`, which a benchmark's
            # codec for a machine without ffmpeg replaces.
            codec.encode_clip(
                source, temps[0], fps=fps, steps=list(first.steps), max_bytes=first.encoding.max_bytes
            )
            return
        renders = [
            Render(temp, s.made.steps, s.made.encoding) for temp, s in zip(temps, missing, strict=True)
        ]
        codec.encode_outputs(source, renders, fps=fps)


def result(work: Work) -> str:
    folder, template = work.run.outputs_dir, work.job.template
    outputs = stored(work.job, work.keys)
    # The clip last: once `<template>.mp4` is there, so is every other output of the night.
    for s in reversed(outputs):
        published = publish(work.run.store.path(s.kind, s.key), folder / f"{template}{s.made.tail}")
    return str(published)


def clip_file(store: Store, job: JobSpec, keys: JobKeys) -> Path:
    """Where the store keeps the job's clip (its first MP4), made or not."""
    clip = stored(job, keys)[0]
    return store.path(clip.kind, clip.key)


def outputs_in_store(store: Store, key: str) -> list[dict[str, str]]:
    """The files of a finish output by its key (a run-log row's `output_key`): `name`, `key`, `suffix`,
    `tail`, the clip first; from its manifest, else the one native MP4 a key of a job without other
    outputs names; [] where neither is stored."""
    if store.has(MANIFEST, key):
        try:
            return json.loads(store.path(MANIFEST, key).read_text())["outputs"]
        except (ValueError, KeyError):
            return []  # damaged: the next night's finish finds it so (its digest) and writes it again
    if store.has(STAGE, key):
        return [{"name": NATIVE, "key": key, "suffix": STAGE.suffix, "tail": STAGE.suffix}]
    return []


STAGE = Stage(
    name="finish",
    output="clip",
    suffix=".mp4",
    summary="Make the clip's outputs (MP4s, poster, preview) in one ffmpeg run and publish them; returns the "
    "clip's path.",
    task_name="finish-clip",
    key=key,
    compute=compute,
    inputs=(decode.STAGE,),
    result=result,
    files=files,
    # Stored before the stage was renamed from "watermark": its keys and folder keep that name.
    store_name=FOLDER,
    formerly=("watermark",),
)
MANIFEST = kind(".outputs.json")
"""The list of a job's outputs, under the stage's key, where it has more than the native MP4."""
