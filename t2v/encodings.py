"""How each output of a clip is encoded at the end of its branch of the finishing graph: an H.264 MP4,
a still image (a poster) or a looping animation (a preview), each with a byte cap.

An encoding adds its output to the graph (`output`), names its file's suffix and media type, and offers
a leaner version of itself (`leaner`) for when its file came out over the cap: `media.encode_outputs`
encodes that output again, alone, until it fits or there is nothing leaner.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import ffmpeg

from t2v.post import FrameInfo, Video

MAX_CLIP_BYTES = 20_000_000
"""Every MP4 is at most this big (platform upload limits)."""
MAX_PREVIEW_BYTES = 5_000_000
"""A preview's default cap: a catalogue page loads many of them."""
MAX_POSTER_BYTES = 2_000_000

# x264 starts with its VBV buffer 90% full, and those bits come on top of maxrate * duration.
_VBV_INIT = 0.9
# Room for the MP4 boxes and x264's small VBV overshoots.
_SIZE_HEADROOM = 0.9
_BUFSIZE_S = 1.0
_QUALITY_STEP = 25
"""How much lower each leaner WebP's quality is (libwebp's 0-100 scale)."""
_MIN_QUALITY = 10


class Encoding(Protocol):
    """The last part of an output's branch: its encoder, muxer and cap."""

    max_bytes: int

    @property
    def suffix(self) -> str:
        """The file's suffix in the store and where it is published (".mp4", ".jpg"...)."""
        ...

    @property
    def media_type(self) -> str:
        """Its Content-Type, for the dashboard."""
        ...

    def validate(self) -> None:
        """Raise ValueError naming the bad field in backticks and showing its value."""
        ...

    def output(self, video: Video, dest: Path, frame: FrameInfo) -> ffmpeg.nodes.OutputStream:
        """Encode `video` (frames as `frame` describes them) to `dest`."""
        ...

    def leaner(self) -> Encoding | None:
        """The same output at a lower quality, for a file that came out over `max_bytes`; None: none."""
        ...


def _check_cap(owner: str, max_bytes: object) -> None:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
        raise ValueError(f"`{owner}.max_bytes` must be a positive whole number but is {max_bytes!r}")


@dataclass(frozen=True)
class H264:
    """H.264 High, yuv420p with BT.709 tags, constant frame rate, moov first (+faststart)."""

    max_bytes: int = MAX_CLIP_BYTES
    crf: int = 18

    @property
    def suffix(self) -> str:
        return ".mp4"

    @property
    def media_type(self) -> str:
        return "video/mp4"

    def validate(self) -> None:
        _check_cap("mp4", self.max_bytes)

    def maxrate(self, frame: FrameInfo) -> int:
        """The VBV rate that keeps `frame.frames` frames at `frame.fps` within the cap."""
        # VBV bounds the total at maxrate * duration plus the initially full part of the buffer; size
        # maxrate so that sum stays under the budget (the plain budget/duration would overshoot on
        # short clips). ffmpeg stores bufsize in an int32; a cap that high never binds anyway.
        duration = frame.frames / frame.fps
        budget_bits = _SIZE_HEADROOM * self.max_bytes * 8
        return min(int(budget_bits / (duration + _VBV_INIT * _BUFSIZE_S)), 2**31 - 1)

    def output(self, video: Video, dest: Path, frame: FrameInfo) -> ffmpeg.nodes.OutputStream:
        # yuv420p needs even dimensions; pad rather than crop so no picture is lost. No-op for even sizes.
        video = video.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
        # Explicit BT.709 conversion plus matching tags, so players don't guess the matrix differently.
        # The tags go on the frames (setparams) because ffmpeg's encoder takes them from there.
        video = (
            video.filter("scale", out_color_matrix="bt709", out_range="tv")
            .filter("format", "yuv420p")
            .filter("setparams", range="tv", color_primaries="bt709", color_trc="bt709", colorspace="bt709")
        )
        maxrate = self.maxrate(frame)
        return video.output(
            str(dest),
            format="mp4",
            vcodec="libx264",
            crf=self.crf,
            maxrate=maxrate,
            bufsize=int(maxrate * _BUFSIZE_S),
            r=frame.fps,
            fps_mode="cfr",
            movflags="+faststart",
            an=None,
        )

    def leaner(self) -> None:
        return None  # the VBV cap is the rate control; x264 has nothing leaner to offer


@dataclass(frozen=True)
class Still:
    """One frame as a JPEG (BT.601 full range, as JFIF readers expect) or a WebP."""

    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = 90
    """0-100, higher is better (JPEG's is mapped onto ffmpeg's 2-31 scale)."""
    max_bytes: int = MAX_POSTER_BYTES

    @property
    def suffix(self) -> str:
        return ".jpg" if self.format == "jpeg" else ".webp"

    @property
    def media_type(self) -> str:
        return f"image/{self.format}"

    def validate(self) -> None:
        if self.format not in ("jpeg", "webp"):
            raise ValueError(f"`poster.format` must be jpeg or webp but is {self.format!r}")
        _check_cap("poster", self.max_bytes)

    def output(self, video: Video, dest: Path, frame: FrameInfo) -> ffmpeg.nodes.OutputStream:
        if self.format == "webp":
            # RGB in: libwebp converts to its YUV itself.
            video = video.filter("format", "rgb24")
            return video.output(str(dest), format="webp", vcodec="libwebp", quality=self.quality, update=1)
        video = video.filter("scale", out_color_matrix="bt601", out_range="pc").filter("format", "yuvj444p")
        qscale = round(2 + (100 - self.quality) * 29 / 100)
        return video.output(str(dest), format="image2", vcodec="mjpeg", update=1, **{"q:v": qscale})

    def leaner(self) -> Still | None:
        if self.quality <= _MIN_QUALITY:
            return None
        return replace(self, quality=max(_MIN_QUALITY, self.quality - _QUALITY_STEP))


@dataclass(frozen=True)
class Animation:
    """A looping animated WebP, or a GIF with a palette made for the clip (palettegen in the graph)."""

    format: Literal["webp", "gif"] = "webp"
    max_bytes: int = MAX_PREVIEW_BYTES
    quality: int = 75
    """WebP: libwebp's 0-100 quality."""
    colors: int = 256
    """GIF: the palette's size."""

    @property
    def suffix(self) -> str:
        return f".{self.format}"

    @property
    def media_type(self) -> str:
        return f"image/{self.format}"

    def validate(self) -> None:
        if self.format not in ("webp", "gif"):
            raise ValueError(f"`preview.format` must be webp or gif but is {self.format!r}")
        _check_cap("preview", self.max_bytes)

    def output(self, video: Video, dest: Path, frame: FrameInfo) -> ffmpeg.nodes.OutputStream:
        if self.format == "webp":
            video = video.filter("format", "rgb24")
            return video.output(
                str(dest), format="webp", vcodec="libwebp_anim", loop=0, quality=self.quality, r=frame.fps
            )
        # One palette for the whole clip (stats over every frame), then each frame mapped onto it.
        branches = video.split()
        palette = branches[0].filter("palettegen", max_colors=self.colors, stats_mode="full")
        mapped = ffmpeg.filter([branches[1], palette], "paletteuse", dither="sierra2_4a")
        return mapped.output(str(dest), format="gif", loop=0, r=frame.fps)

    def leaner(self) -> Animation | None:
        if self.format == "webp":
            if self.quality <= _MIN_QUALITY:
                return None
            return replace(self, quality=max(_MIN_QUALITY, self.quality - _QUALITY_STEP))
        return replace(self, colors=self.colors // 2) if self.colors > 32 else None
