"""Video I/O for the pipeline: lossless intermediates, and a clip's size-capped outputs (MP4s, a poster, a
preview) made through their post steps in one ffmpeg run.

Everything goes through imageio-ffmpeg's bundled binary because the GPU hosts have no system ffmpeg.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import ffmpeg
import numpy as np

from t2v.encodings import H264, MAX_CLIP_BYTES, Animation, Encoding, Still

# The post steps live in t2v.post; they are re-exported here because jobs, the CLI and the tests import
# them from the module that encodes with them.
from t2v.post import POST_STEPS, Corner, FrameInfo, PostStep, Watermark, render_watermark_png

__all__ = [
    "FFMPEG",
    "H264",
    "POST_STEPS",
    "Animation",
    "Codec",
    "Corner",
    "Encoding",
    "FrameInfo",
    "MediaError",
    "PostStep",
    "Render",
    "Still",
    "Watermark",
    "encode_clip",
    "encode_mp4",
    "encode_outputs",
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


@dataclass(frozen=True)
class Render:
    """One file made from a clip's frames: the post steps of its branch of the graph, then its encoding."""

    dest: Path
    steps: tuple[PostStep, ...]
    encoding: Encoding

    def describe(self) -> str:
        return f"{self.dest} (post steps: {', '.join(step.name for step in self.steps) or 'none'})"


def encode_outputs(source: Path, renders: Sequence[Render], *, fps: int) -> None:
    """Make every render's file from `source` at `fps` in one ffmpeg run: the frames are decoded once and
    split into one branch per render, which applies its steps in order and ends in its encoder.

    Every step and encoding is validated before ffmpeg starts, so a bad one costs no probe or encode.
    A file over its encoding's cap is made again alone with `encoding.leaner()` until it fits (a
    preview of unusually busy footage); an MP4 over its cap, or a file with nothing leaner, is a
    MediaError.
    """
    if not isinstance(fps, int) or fps <= 0:
        raise ValueError(f"`fps` must be a positive whole number but is {fps!r}")
    if not renders:
        raise ValueError("`renders` must name at least one file to make")
    for render in renders:
        render.encoding.validate()
        for step in render.steps:
            step.validate()
    width, height, frame_count = _probe(source)
    clip = FrameInfo(width=width, height=height, frames=frame_count, fps=fps)
    _encode(source, renders, clip)
    for render in renders:
        encoding = render.encoding
        while (size := render.dest.stat().st_size) > encoding.max_bytes:
            leaner = encoding.leaner()
            if leaner is None:
                # A cap that was silently exceeded would only show up when the upload is rejected.
                raise MediaError(
                    f"{render.dest} is {size} bytes, over the {encoding.max_bytes} byte cap ({encoding})"
                )
            encoding = leaner
            _encode(source, [replace(render, encoding=encoding)], clip)


def _encode(source: Path, renders: Sequence[Render], clip: FrameInfo) -> None:
    # Input -r discards the container's millisecond timestamps so every frame maps to exactly one output slot.
    video = ffmpeg.input(str(source), r=clip.fps)["v:0"]
    # ffmpeg-python wants a stream used twice to go through an explicit split.
    branches = video.split() if len(renders) > 1 else None
    # Outside the store's folder: its cleanup of dead writers' leftovers removes files, not folders.
    with tempfile.TemporaryDirectory(prefix="t2v-post-") as tmp:
        outputs = []
        for index, render in enumerate(renders):
            stream = branches[index] if branches is not None else video
            frame = clip
            for number, step in enumerate(render.steps):
                workdir = Path(tmp, f"{index}-{number}-{step.name}")
                workdir.mkdir()
                stream = step.apply(stream, frame, workdir)
                after = step.output_frame(frame)
                if after.width <= 0 or after.height <= 0:
                    raise ValueError(
                        f"post step `{step.name}` turns {frame.width}x{frame.height} frames into "
                        f"{after.width}x{after.height}"
                    )
                frame = after
            outputs.append(render.encoding.output(stream, render.dest, frame))
        graph = outputs[0] if len(outputs) == 1 else ffmpeg.merge_outputs(*outputs)
        _run(graph.overwrite_output(), "encode " + "; ".join(r.describe() for r in renders))


def encode_clip(
    source: Path,
    dest: Path,
    *,
    fps: int,
    steps: Sequence[PostStep],
    max_bytes: int = MAX_CLIP_BYTES,
    crf: int = 18,
) -> None:
    """Encode `source` through `steps` (in order) to an H.264/yuv420p faststart MP4 at constant `fps`,
    within max_bytes, in one ffmpeg graph: `encode_outputs` with one MP4."""
    encode_outputs(source, [Render(dest, tuple(steps), H264(max_bytes=max_bytes, crf=crf))], fps=fps)


def encode_mp4(
    source: Path,
    dest: Path,
    *,
    fps: int,
    watermark: Watermark | None,
    max_bytes: int = MAX_CLIP_BYTES,
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
        self,
        source: Path,
        dest: Path,
        *,
        fps: int,
        steps: Sequence[PostStep],
        max_bytes: int = MAX_CLIP_BYTES,
    ) -> None:
        """Turn stored frames into one MP4, applying `steps` in order."""
        encode_clip(source, dest, fps=fps, steps=steps, max_bytes=max_bytes)

    def encode_outputs(self, source: Path, renders: Sequence[Render], *, fps: int) -> None:
        """Turn stored frames into several files in one pass (`encode_outputs`)."""
        encode_outputs(source, renders, fps=fps)


FFMPEG = Codec()
