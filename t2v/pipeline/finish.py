"""Finish: the frames through the job's post steps (the watermark first) into one size-capped H.264
MP4, stored and then published as `<outputs_dir>/<template>.mp4`. On the CPU, with ffmpeg."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from t2v.jobs import JobSpec
from t2v.pipeline import decode
from t2v.pipeline.stage import KeyInputs, Stage, Work
from t2v.store import publish

MAX_CLIP_BYTES = 20_000_000
"""Every published clip is at most this big (platform upload limits)."""


def post_steps(job: JobSpec) -> list:
    """The job's post steps in the order the graph applies them."""
    return [job.watermark]


def key(k: KeyInputs) -> dict[str, object]:
    watermark = asdict(k.job.watermark)
    if k.job.watermark.image:
        # The image's bytes, not its path: the same file moved keeps the clip, an edited one does not.
        watermark["image"] = hashlib.sha256(Path(k.job.watermark.image).read_bytes()).hexdigest()
    return dict(fps=k.job.fps, watermark=watermark, max_bytes=MAX_CLIP_BYTES)


def compute(work: Work) -> None:
    with work.run.store.writing(work.stage, work.key) as temp:
        work.run.codec.encode_clip(
            work.input_path(decode.STAGE),
            temp,
            fps=work.job.fps,
            steps=post_steps(work.job),
            max_bytes=MAX_CLIP_BYTES,
        )


def result(work: Work) -> str:
    stored = work.run.store.path(work.stage, work.key)
    return str(publish(stored, work.run.outputs_dir / f"{work.job.template}.mp4"))


STAGE = Stage(
    name="finish",
    output="clip",
    suffix=".mp4",
    summary="Run the frames through the post steps into an H.264 MP4 and publish it; returns its path.",
    task_name="finish-clip",
    key=key,
    compute=compute,
    inputs=(decode.STAGE,),
    result=result,
    # Stored before the stage was renamed from "watermark": its keys and folder keep that name.
    store_name="watermark",
    formerly=("watermark",),
)
