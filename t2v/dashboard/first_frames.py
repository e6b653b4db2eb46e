"""The conditioning picture of a night's image jobs, as the dashboard shows it beside the clip.

Which picture a job used: the night's job specs (`runs.jobs_json`, `t2v.rerun.Night`) give its path,
size and fit, and the file there now is the one the job used only if the job's keys computed from it
are the run log's (`job_key` on every row of the job: the last stage's key, which hashes the picture's
bytes through the first frame's key). A picture edited or moved since is not shown; the page says so.
What is shown is the first frame the model was given, the picture fitted to the clip
(`images.fit_picture`) as PNG, under the first frame's store key (`condition.key`): a URL names
content, never a path, and the bytes are hashed again before they are drawn.

A one-off `t2v generate` keeps no job specs in the run log, so its clips show no picture.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2v import images
from t2v.errors import T2VError
from t2v.models.registry import resolve_model
from t2v.pipeline import JobKeys, KeyInputs, condition, stages
from t2v.rerun import Night

__all__ = ["FirstFrame", "first_frames", "png"]


@dataclass(frozen=True)
class FirstFrame:
    """An image job's first frame, as its store key names it."""

    key: str
    """The first frame's store key (`condition.key`): 32 hex digits, the URL's only part."""
    image: str
    """The picture's path, as the night's job spec has it."""
    digest: str
    """SHA-256 of the picture's bytes when the night's keys were checked."""
    width: int
    height: int
    fit: str | None

    def describe(self) -> dict[str, Any]:
        """What the page shows: the URL, the picture's file name, the size and the fit."""
        return {
            "url": f"/first-frames/{self.key}.png",
            "picture": Path(self.image).name,
            "size": f"{self.width}x{self.height}",
            "fit": self.fit,
        }


def first_frames(run: dict[str, Any]) -> dict[str, FirstFrame | str]:
    """By template, each image job's first frame, or a note saying why it is not shown; text-only jobs
    and jobs with no row in the run are left out."""
    try:
        night = Night.from_json(run["jobs_json"]) if run.get("jobs_json") else None
    except (ValueError, KeyError, TypeError):
        return {}  # a run log from another t2v: nothing to show beside the clips
    pictured = [job for job in night.jobs if job.image is not None] if night else []
    job_keys = {row["template"]: row["job_key"] for row in run["stages"]}
    pictured = [job for job in pictured if job.template in job_keys]
    if not pictured:
        return {}
    try:
        model = resolve_model(run["model"])
    except T2VError as exc:
        return dict.fromkeys((job.template for job in pictured), f"picture not checked: {exc}")
    out: dict[str, FirstFrame | str] = {}
    for job in pictured:
        name = Path(job.image).name
        inputs = KeyInputs(job, model, fp8=night.fp8_storage)
        try:
            keys = JobKeys.of(stages(), inputs)
            digest = condition.picture_digest(job.image)
        except OSError:
            out[job.template] = f"picture {name} is no longer at {job.image}"
            continue
        if keys.final != job_keys[job.template]:
            out[job.template] = f"picture {name} has changed since this night"
            continue
        out[job.template] = FirstFrame(
            key=condition.key(inputs),
            image=job.image,
            digest=digest,
            width=job.width,
            height=job.height,
            fit=job.fit,
        )
    return out


def png(frame: FirstFrame) -> bytes | None:
    """The first frame as PNG, or None if the file at its path no longer has the bytes it was checked
    with (or is gone). Not cached: its URL names its content, so the browser caches it."""
    try:
        data = Path(frame.image).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != frame.digest:
        return None
    picture = images.read_picture(frame.image, data=data)
    out = io.BytesIO()
    images.fit_picture(picture, frame.width, frame.height, frame.fit).save(out, format="PNG")
    return out.getvalue()
