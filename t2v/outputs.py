"""What a template asks to be made of its clip besides the MP4: other aspect ratios, a poster, a preview.

The job's fields (`JobSpec.outputs`, `fill`, `focus`, `background`, `poster`, `preview`) hold the
dataclasses below. `coerce_*` turn the forms a catalogue, the CLI or a re-run's JSON gives into them
(leaving what they cannot read for `check_outputs` to name); `check_outputs` is the one validation, run
with the job's; `made_of` turns a job into its files' names, post steps and encodings, which the finish
stage keys, makes and publishes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from t2v.encodings import H264, MAX_CLIP_BYTES, MAX_PREVIEW_BYTES, Animation, Encoding, Still
from t2v.errors import InvalidInput
from t2v.post import (
    ASPECTS,
    FILLS,
    FOCUSES,
    FrameInfo,
    PickFrame,
    PostStep,
    Reframe,
    Resample,
    changed_axis,
    focus_applies,
)

if TYPE_CHECKING:
    from t2v.jobs import JobSpec

NATIVE = "native"
"""The clip as the model made it: its own aspect, no reframing (`<template>.mp4`)."""
POSTER_FRAMES = ("first", "middle", "last")
MIN_PREVIEW_SIDE = 16
PREVIEW_WIDTH = 320
MIN_FRAME_BYTES = {"webp": 64, "gif": 160}
"""Bytes each frame of a preview needs at the least, at the leanest quality, for footage in which
anything moves at all (a 5%-wide square sliding across grey: 65-160 bytes a frame as WebP, 170-385 as
GIF, 96x64 to 1280x704, measured with this ffmpeg). A `preview.max_bytes` below frames times this can
hold nothing that moves, so it is refused with the job; a cap above it that the footage still
overflows at the leanest quality fails the finish stage instead."""


@dataclass(frozen=True)
class Output:
    """One MP4 of the clip: `native`, or reframed to an aspect. A field left None takes the template's."""

    aspect: str = NATIVE
    fill: str | None = None
    focus: str | None = None
    background: str | None = None

    @property
    def name(self) -> str:
        """In file names and the store: `native`, `9x16`..."""
        return self.aspect.replace(":", "x")


@dataclass(frozen=True)
class Poster:
    """A still of one frame: `first`, `middle`, `last` or an index from 0."""

    frame: str | int = "middle"
    format: str = "jpeg"
    """jpeg (or jpg) or webp."""

    def index(self, frames: int) -> int:
        """The frame's index in a clip of `frames` frames."""
        if isinstance(self.frame, int):
            return self.frame
        return {"first": 0, "middle": frames // 2, "last": frames - 1}[self.frame]


@dataclass(frozen=True)
class Preview:
    """A small looping animation of the whole clip."""

    format: str = "webp"
    """webp or gif."""
    width: int | None = None
    """Pixels; None: 320, or the clip's width where that is narrower."""
    fps: int = 12
    max_bytes: int = MAX_PREVIEW_BYTES

    def resample(self, job: JobSpec) -> Resample:
        """The preview's size and rate for `job`'s clip."""
        return Resample(self.width or min(PREVIEW_WIDTH, job.width), self.fps)  # type: ignore[arg-type]


DEFAULT_OUTPUTS: tuple[Output, ...] = (Output(),)


@dataclass(frozen=True)
class Made:
    """One file the finish stage makes of a job's clip."""

    name: str
    """`native`, `9x16`, `poster`, `preview`: in the store's recipe and the dashboard."""
    tail: str
    """What follows the template in its published name: `.mp4`, `.9x16.mp4`, `.poster.jpg`."""
    steps: tuple[PostStep, ...]
    encoding: Encoding


# --- from what a catalogue, the CLI or a re-run's JSON gives ---------------------------------------


def _table(cls: type, value: dict) -> Any:
    """`cls(**value)` when every key is one of its fields; else the dict as it was, for the check."""
    names = {f.name for f in fields(cls)}
    return cls(**value) if set(value) <= names else value


def coerce_outputs(value: object) -> object:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    return tuple(
        Output(item) if isinstance(item, str) else _table(Output, item) if isinstance(item, dict) else item
        for item in value
    )


def coerce_poster(value: object) -> object:
    if value is None or value is False:
        return None
    if value is True:
        return Poster()
    if isinstance(value, str | int) and not isinstance(value, bool):
        return Poster(frame=value)
    if isinstance(value, dict):
        value = _table(Poster, value)
    if isinstance(value, Poster) and value.format == "jpg":
        return Poster(frame=value.frame, format="jpeg")
    return value


def coerce_preview(value: object) -> object:
    if value is None or value is False:
        return None
    if value is True:
        return Preview()
    if isinstance(value, str):
        return Preview(format=value)
    return _table(Preview, value) if isinstance(value, dict) else value


# --- the check ------------------------------------------------------------------------------------


def _bad(name: str, value: object, rule: str) -> InvalidInput:
    return InvalidInput(f"`{name}` {rule} but is {value!r}.")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_outputs(job: JobSpec) -> None:
    """Raise InvalidInput naming the first output field that is wrong for this job (its size, length
    and rate), before any model loads."""
    _check_choice("fill", job.fill, FILLS)
    _check_choice("focus", job.focus, FOCUSES)
    _check_background("background", job.background)
    if not isinstance(job.outputs, tuple) or not job.outputs:
        shown = list(job.outputs) if isinstance(job.outputs, tuple) else job.outputs
        raise _bad("outputs", shown, f"must be a list of aspects ({', '.join([NATIVE, *ASPECTS])})")
    seen: set[str] = set()
    focus_used = False
    for i, output in enumerate(job.outputs):
        where = f"outputs[{i}]"
        if not isinstance(output, Output):
            keys = ", ".join(f.name for f in fields(Output))
            raise _bad(where, output, f"must be an aspect or a table of {keys}")
        if output.aspect != NATIVE and output.aspect not in ASPECTS:
            raise _bad(f"{where}.aspect", output.aspect, f"must be one of {', '.join([NATIVE, *ASPECTS])}")
        if output.aspect in seen:
            raise _bad(f"{where}.aspect", output.aspect, "must be listed once (each makes one file)")
        seen.add(output.aspect)
        _check_choice(f"{where}.fill", output.fill, FILLS, optional=True)
        _check_choice(f"{where}.focus", output.focus, FOCUSES, optional=True)
        _check_background(f"{where}.background", output.background, optional=True)
        focus_used |= _check_focus(job, output, where)
    if job.focus != "center" and not focus_used:
        raise _bad("focus", job.focus, "does not apply: no output is cropped or padded along it; use center")
    _check_poster(job)
    _check_preview(job)


def _check_choice(name: str, value: object, choices: tuple[str, ...], *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise _bad(name, value, f"must be one of {', '.join(choices)}")


def _check_background(name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    try:
        Reframe(background=value).validate()  # type: ignore[arg-type]
    except ValueError:
        raise _bad(name, value, "must be blur or a colour (a name or #rrggbb)") from None


def _check_focus(job: JobSpec, output: Output, where: str) -> bool:
    """Whether the template's focus is the one this output crops or pads along; raises where its
    focus (its own or the template's) does not apply to it."""
    if output.aspect == NATIVE:
        if output.focus not in (None, "center"):
            raise _bad(f"{where}.focus", output.focus, "does not apply: the native clip is not reframed")
        return False
    fill = output.fill or job.fill
    axis = changed_axis(output.aspect, fill, job.width, job.height)  # type: ignore[arg-type]
    focus = output.focus or job.focus
    if not focus_applies(focus, axis):
        along = "top or bottom" if axis == "y" else "left or right"
        cut = {"x": "sides", "y": "top and bottom"}.get(axis or "", "")
        rule = (
            f"must be center, {along} for the {output.aspect} {fill} of a {job.width}x{job.height} clip "
            f"(it {'cuts' if fill == 'crop' else 'adds to'} the {cut})"
            if axis
            else f"does not apply: the {output.aspect} {fill} leaves a {job.width}x{job.height} clip as it is"
        )
        raise _bad(f"{where}.focus" if output.focus else "focus", focus, rule)
    return output.focus is None and axis is not None


def _check_poster(job: JobSpec) -> None:
    poster = job.poster
    if poster is None:
        return
    if not isinstance(poster, Poster):
        keys = ", ".join(f.name for f in fields(Poster))
        raise _bad("poster", poster, f"must be first, middle, last, a frame index or a table of {keys}")
    frame = poster.frame
    if frame not in POSTER_FRAMES and not (_whole(frame) and 0 <= frame < job.frames):  # type: ignore[operator]
        raise _bad(
            "poster.frame", frame, f"must be first, middle, last or a frame index from 0 to {job.frames - 1}"
        )
    _check_choice("poster.format", poster.format, ("jpeg", "webp"))


def _check_preview(job: JobSpec) -> None:
    preview = job.preview
    if preview is None:
        return
    if not isinstance(preview, Preview):
        keys = ", ".join(f.name for f in fields(Preview))
        raise _bad("preview", preview, f"must be webp, gif or a table of {keys}")
    _check_choice("preview.format", preview.format, tuple(MIN_FRAME_BYTES))
    width = preview.width
    if width is not None and (not _whole(width) or not MIN_PREVIEW_SIDE <= width <= job.width):
        raise _bad(
            "preview.width", preview.width, f"must be {MIN_PREVIEW_SIDE} to the clip's width ({job.width})"
        )
    if not _whole(preview.fps) or not 1 <= preview.fps <= job.fps:
        raise _bad("preview.fps", preview.fps, f"must be 1 to the clip's fps ({job.fps})")
    if not _whole(preview.max_bytes):
        raise _bad("preview.max_bytes", preview.max_bytes, "must be a whole number of bytes")
    clip = FrameInfo(width=job.width, height=job.height, frames=job.frames, fps=job.fps)
    frames = preview.resample(job).output_frame(clip).frames
    floor = frames * MIN_FRAME_BYTES[preview.format]
    if preview.max_bytes < floor:
        raise _bad(
            "preview.max_bytes",
            preview.max_bytes,
            f"is too small to meet: {frames} {preview.format} frames need at least {floor} bytes",
        )


# --- what the finish stage makes --------------------------------------------------------------------


def is_default(job: JobSpec) -> bool:
    """Only the native MP4: what every job was before outputs, whose store keys stay as they were."""
    return job.outputs == DEFAULT_OUTPUTS and job.poster is None and job.preview is None


def made_of(job: JobSpec) -> list[Made]:
    """The job's files in order: its MP4s as listed (the first is the clip), then poster and preview.
    Every file's steps end with the job's watermark, placed in that file's own frame."""
    made = []
    for output in job.outputs:
        steps: tuple[PostStep, ...] = (job.watermark,)
        if output.aspect != NATIVE:
            reframe = Reframe(
                aspect=output.aspect,
                fill=output.fill or job.fill,  # type: ignore[arg-type]
                focus=output.focus or job.focus,  # type: ignore[arg-type]
                background=output.background or job.background,
            )
            steps = (reframe, *steps)
        tail = ".mp4" if output.aspect == NATIVE else f".{output.name}.mp4"
        made.append(Made(output.name, tail, steps, H264(max_bytes=MAX_CLIP_BYTES)))
    if job.poster is not None:
        still = Still(format=job.poster.format)  # type: ignore[arg-type]
        steps = (PickFrame(job.poster.index(job.frames)), job.watermark)
        made.append(Made("poster", f".poster{still.suffix}", steps, still))
    if job.preview is not None:
        p = job.preview
        animation = Animation(format=p.format, max_bytes=p.max_bytes)  # type: ignore[arg-type]
        made.append(
            Made("preview", f".preview{animation.suffix}", (p.resample(job), job.watermark), animation)
        )
    return made
