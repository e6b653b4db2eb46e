"""Video I/O for the pipeline: lossless intermediates, watermarking and the final size-capped MP4.

Everything goes through imageio-ffmpeg's bundled binary because the GPU hosts have no system ffmpeg.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageFont

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]

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


@dataclass(frozen=True)
class Watermark:
    """What to stamp on each clip: an image file, or text rendered with Pillow when no image is given."""

    text: str = "t2v"
    image: Path | None = None  # takes precedence over text
    corner: Corner = "bottom-right"
    opacity: float = 0.85  # 0..1, multiplied into the watermark's alpha
    scale: float = 0.12  # text: height as a share of frame height; image: width as a share of frame width
    margin: float = 0.03  # share of frame height kept between the watermark and the edges

    def validate(self) -> None:
        corners = get_args(Corner)
        if self.corner not in corners:
            raise ValueError(f"`watermark.corner` must be one of {', '.join(corners)} but is {self.corner!r}")
        if not 0.0 <= self.opacity <= 1.0:
            raise ValueError(f"`watermark.opacity` must be within 0..1 but is {self.opacity!r}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"`watermark.scale` must be within (0, 1] but is {self.scale!r}")
        if not 0.0 <= self.margin < 0.5:
            raise ValueError(f"`watermark.margin` must be within [0, 0.5) but is {self.margin!r}")
        if self.image is None:
            if not self.text.strip():
                raise ValueError(
                    f"`watermark.text` must not be blank when no image is given but is {self.text!r}"
                )
            return
        image = Path(self.image)
        if not image.is_file():
            raise ValueError(f"`watermark.image` must be an existing file but is '{image}'")
        try:
            with Image.open(image) as im:
                im.verify()
        except Exception as exc:  # Pillow raises a zoo of types for broken files
            raise ValueError(f"`watermark.image` '{image}' is not an image ({exc})") from exc


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


def render_watermark_png(watermark: Watermark, *, frame_width: int, frame_height: int, dest: Path) -> Path:
    """Render `watermark` as an RGBA PNG sized for a frame_width x frame_height frame; returns dest."""
    watermark.validate()
    margin = round(watermark.margin * frame_height)
    # Whatever the scale asks for, the mark has to fit inside the margins.
    max_w, max_h = max(1, frame_width - 2 * margin), max(1, frame_height - 2 * margin)
    if watermark.image is not None:
        with Image.open(watermark.image) as im:
            mark = im.convert("RGBA")
        target_w = max(1, round(watermark.scale * frame_width))
        target_h = max(1, round(mark.height * target_w / mark.width))
    else:
        mark = _draw_text(watermark.text)
        target_h = max(1, round(watermark.scale * frame_height))
        target_w = max(1, round(mark.width * target_h / mark.height))
    shrink = min(1.0, max_w / target_w, max_h / target_h)
    size = (max(1, math.floor(target_w * shrink)), max(1, math.floor(target_h * shrink)))
    mark = mark.resize(size, Image.Resampling.LANCZOS)
    alpha = mark.getchannel("A").point(lambda a: round(a * watermark.opacity))
    mark.putalpha(alpha)
    mark.save(dest, format="PNG")
    return dest


def _draw_text(text: str) -> Image.Image:
    # Drawn large and downscaled afterwards: small font sizes hint badly, and the resize lands on the
    # exact target height regardless of the font's ascent/descent.
    size = 96
    stroke = size // 12  # dark outline so white text reads on light and dark footage alike
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGBA", (1, 1))).textbbox(
        (0, 0), text, font=font, stroke_width=stroke
    )
    canvas = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text(
        (-left, -top),
        text,
        font=font,
        fill=(255, 255, 255, 255),
        stroke_width=stroke,
        stroke_fill=(0, 0, 0, 255),
    )
    return canvas


def _corner_position(corner: Corner, margin: int) -> tuple[str, str]:
    x = str(margin) if corner.endswith("left") else f"main_w-overlay_w-{margin}"
    y = str(margin) if corner.startswith("top") else f"main_h-overlay_h-{margin}"
    return x, y


def encode_mp4(
    source: Path,
    dest: Path,
    *,
    fps: int,
    watermark: Watermark | None,
    max_bytes: int = 20_000_000,
    crf: int = 18,
) -> None:
    """Encode `source` to a watermarked H.264/yuv420p faststart MP4 at constant `fps`, within max_bytes."""
    if fps <= 0 or max_bytes <= 0:
        raise ValueError(f"`fps` and `max_bytes` must be positive but are {fps!r} and {max_bytes!r}")
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
    png = dest.with_name(dest.name + ".watermark.png")
    try:
        if watermark is not None:
            render_watermark_png(watermark, frame_width=width, frame_height=height, dest=png)
            x, y = _corner_position(watermark.corner, round(watermark.margin * height))
            # Overlay in RGB so the mark's edges are blended before chroma subsampling, not after.
            video = ffmpeg.overlay(video, ffmpeg.input(str(png)), x=x, y=y, format="gbrp")
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
        _run(stream.overwrite_output(), f"encode {dest}")
    finally:
        png.unlink(missing_ok=True)
    size = dest.stat().st_size
    if size > max_bytes:
        # x264's rate control is best effort at its minimum quality; a cap that was silently exceeded
        # would only show up when the upload is rejected.
        raise MediaError(
            f"{dest} is {size} bytes, over the {max_bytes} byte cap despite maxrate {maxrate} b/s"
        )
