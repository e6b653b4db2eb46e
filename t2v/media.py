"""Video I/O for the pipeline: lossless intermediates and the final size-capped MP4 with its post steps.

Everything goes through imageio-ffmpeg's bundled binary because the GPU hosts have no system ffmpeg.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import ffmpeg
import numpy as np

# The post steps live in t2v.post; they are re-exported here because jobs, the CLI and the tests import
# them from the module that encodes with them.
from t2v.post import POST_STEPS, Corner, FrameInfo, PostStep, Watermark, render_watermark_png

__all__ = [
    "FFMPEG",
    "POST_STEPS",
    "Codec",
    "Corner",
    "FrameInfo",
    "MediaError",
    "PostStep",
    "Watermark",
    "encode_clip",
    "encode_mp4",
    "ffmpeg_exe",
    "read_frames",
    "render_watermark_png",
    "write_frames_lossless",
]

# Keep ffmpeg quiet unless something goes wrong, so the stderr we attach to errors is the actual cause.
_GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-loglevel", "error")
_STDERR_TAIL = 2000
# ffmpeg's ppm encoder writes one "P6\n<w> <h>\n255\n" header per frame; reading PPMs gives us the frame
# size in-band, which spares us stderr parsing (imageio-ffmpeg ships no ffprobe).
_PPM_HEADER = re.compile(rb"P6\s(\d+)\s(\d+)\s255\s")
# x264 starts with its VBV buffer 90% full, and those bits come on top of maxrate * duration.
_VBV_INIT = 0.9
# Room for the MP4 boxes and x264's small VBV overshoots.
_SIZE_HEADROOM = 0.9


class MediaError(Exception):
    """ffmpeg failed or a media input is unusable."""


def ffmpeg_exe() -> str:
    # Imported here so that GPU machines without imageio-ffmpeg can still import the library.
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run(stream: ffmpeg.nodes.OutputStream, what: str, *, stdin: bytes | None = None) -> bytes:
    try:
        out, _ = stream.global_args(*_GLOBAL_ARGS).run(
            cmd=ffmpeg_exe(), input=stdin, capture_stdout=True, capture_stderr=True
        )
    except ffmpeg.Error as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip()[-_STDERR_TAIL:]
        raise MediaError(f"ffmpeg failed to {what}: {tail or '(no stderr)'}") from exc
    return out


def write_frames_lossless(frames: np.ndarray, dest: Path, *, fps: int) -> None:
    """Write uint8 (F, H, W, 3) RGB frames to `dest` as FFV1 in Matroska, bit-exact on read-back."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(
            f"`frames` must be a non-empty uint8 (F, H, W, 3) array but is {frames.dtype} {frames.shape}"
        )
    if fps <= 0:
        raise ValueError(f"`fps` must be positive but is {fps!r}")
    _, height, width, _ = frames.shape
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    # gbrp is FFV1's RGB layout with no colour conversion, which is what makes the round trip exact;
    # level 3 allows slice threading.
    stream = stream.output(str(dest), format="matroska", vcodec="ffv1", level=3, pix_fmt="gbrp")
    _run(stream.overwrite_output(), f"write {dest}", stdin=np.ascontiguousarray(frames).tobytes())


def read_frames(path: Path) -> np.ndarray:
    """Decode the first video stream of any file ffmpeg can read into uint8 (F, H, W, 3) RGB."""
    return _decode_rgb(path)


def _decode_rgb(path: Path, **limits: int) -> np.ndarray:
    stream = ffmpeg.input(str(path)).output(
        "pipe:", map="0:v:0", format="image2pipe", vcodec="ppm", pix_fmt="rgb24", **limits
    )
    data = _run(stream, f"read {path}")
    header = _PPM_HEADER.match(data)
    if header is None:
        raise MediaError(f"ffmpeg decoded no video frames from {path}")
    width, height = int(header[1]), int(header[2])
    # ffmpeg rescales mid-stream size changes to the first frame's size, so every record has the same length.
    record = header.end() + width * height * 3
    if len(data) % record:
        raise MediaError(f"ffmpeg returned a truncated frame stream for {path}")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    return records[:, header.end() :].reshape(-1, height, width, 3).copy()


def _probe(path: Path) -> tuple[int, int, int]:
    """(width, height, frame count) of the first video stream, without decoding the whole file."""
    _, height, width, _ = _decode_rgb(path, frames=1).shape
    # Stream copy into the null muxer counts packets without decoding; -progress reports the total.
    count = ffmpeg.input(str(path)).output("-", map="0:v:0", vcodec="copy", format="null", progress="pipe:1")
    frames = re.findall(rb"^frame=(\d+)", _run(count, f"count frames of {path}"), flags=re.MULTILINE)
    if not frames or int(frames[-1]) == 0:
        raise MediaError(f"{path} has no video frames")
    return width, height, int(frames[-1])


def encode_clip(
    source: Path,
    dest: Path,
    *,
    fps: int,
    steps: Sequence[PostStep],
    max_bytes: int = 20_000_000,
    crf: int = 18,
) -> None:
    """Encode `source` through `steps` (in order) to an H.264/yuv420p faststart MP4 at constant `fps`,
    within max_bytes, in one ffmpeg graph.

    Every step is validated before ffmpeg starts, so a bad step costs no probe or encode.
    """
    if fps <= 0 or max_bytes <= 0:
        raise ValueError(f"`fps` and `max_bytes` must be positive but are {fps!r} and {max_bytes!r}")
    for step in steps:
        step.validate()
    width, height, frame_count = _probe(source)
    duration = frame_count / fps
    # VBV bounds the total at maxrate * duration plus the initially full part of the buffer; size maxrate
    # so that sum stays under the budget (the plain budget/duration would overshoot on short clips).
    budget_bits = _SIZE_HEADROOM * max_bytes * 8
    bufsize_s = 1.0
    # ffmpeg stores bufsize in an int32; a cap that high never binds anyway.
    maxrate = min(int(budget_bits / (duration + _VBV_INIT * bufsize_s)), 2**31 - 1)

    # Input -r discards the container's millisecond timestamps so every frame maps to exactly one output slot.
    video = ffmpeg.input(str(source), r=fps)["v:0"]
    # Outside the store's folder: its cleanup of dead writers' leftovers removes files, not folders.
    with tempfile.TemporaryDirectory(prefix="t2v-post-") as tmp:
        frame = FrameInfo(width=width, height=height, frames=frame_count, fps=fps)
        for index, step in enumerate(steps):
            workdir = Path(tmp, f"{index}-{step.name}")
            workdir.mkdir()
            video = step.apply(video, frame, workdir)
            out_w, out_h = step.output_size(frame.width, frame.height)
            if out_w <= 0 or out_h <= 0:
                raise ValueError(
                    f"post step `{step.name}` turns {frame.width}x{frame.height} frames into {out_w}x{out_h}"
                )
            frame = replace(frame, width=out_w, height=out_h)
        # yuv420p needs even dimensions; pad rather than crop so no picture is lost. No-op for even sizes.
        video = video.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
        # Explicit BT.709 conversion plus matching tags, so players don't guess the matrix differently.
        # The tags go on the frames (setparams) because ffmpeg's encoder takes them from there.
        video = (
            video.filter("scale", out_color_matrix="bt709", out_range="tv")
            .filter("format", "yuv420p")
            .filter("setparams", range="tv", color_primaries="bt709", color_trc="bt709", colorspace="bt709")
        )
        stream = video.output(
            str(dest),
            format="mp4",
            vcodec="libx264",
            crf=crf,
            maxrate=maxrate,
            bufsize=int(maxrate * bufsize_s),
            r=fps,
            fps_mode="cfr",
            movflags="+faststart",
            an=None,
        )
        names = ", ".join(step.name for step in steps) or "none"
        _run(stream.overwrite_output(), f"encode {dest} (post steps: {names})")
    size = dest.stat().st_size
    if size > max_bytes:
        # x264's rate control is best effort at its minimum quality; a cap that was silently exceeded
        # would only show up when the upload is rejected.
        raise MediaError(
            f"{dest} is {size} bytes, over the {max_bytes} byte cap despite maxrate {maxrate} b/s"
        )


def encode_mp4(
    source: Path,
    dest: Path,
    *,
    fps: int,
    watermark: Watermark | None,
    max_bytes: int = 20_000_000,
    crf: int = 18,
) -> None:
    """`encode_clip` with the watermark as the only post step (none when `watermark` is None)."""
    # Kept for callers that still pass one watermark (the runner, bench/night.py's replacement).
    steps = [watermark] if watermark is not None else []
    encode_clip(source, dest, fps=fps, steps=steps, max_bytes=max_bytes, crf=crf)


class Codec:
    """The runner's video file I/O, as one object a caller can replace.

    A benchmark on a machine without ffmpeg passes a subclass (frames as .npy, a copy for the encode)
    instead of patching this module's functions. The methods look the module functions up when called,
    so a test that patches `t2v.media.write_frames_lossless` still reaches the default codec.
    """

    def write_frames(self, frames: np.ndarray, dest: Path, *, fps: int) -> None:
        """Store uint8 (F, H, W, 3) RGB frames at `dest` so that `read_frames` gives them back exactly."""
        write_frames_lossless(frames, dest, fps=fps)

    def read_frames(self, path: Path) -> np.ndarray:
        """uint8 (F, H, W, 3) RGB frames of the video at `path`."""
        return read_frames(path)

    def encode_clip(
        self, source: Path, dest: Path, *, fps: int, steps: Sequence[PostStep], max_bytes: int = 20_000_000
    ) -> None:
        """Turn stored frames into the published clip, applying `steps` in order."""
        encode_clip(source, dest, fps=fps, steps=steps, max_bytes=max_bytes)


FFMPEG = Codec()
