"""Post steps: what the finish stage does to a clip's frames between decoding and the H.264 encode.

Each step is a frozen dataclass that adds its filters to one shared ffmpeg graph (`media.encode_clip`
runs them in list order), so a clip is read, processed and encoded in a single ffmpeg process.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Protocol, get_args

import ffmpeg
from PIL import Image, ImageDraw, ImageFont

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
Video = ffmpeg.nodes.FilterableStream

MAX_TEXT_CHARS = 64
"""Longest watermark text: the mark is shrunk to fit the frame, so a long text ends up unreadably small."""
_FONT_SIZE = 96
_NO_SUCH_CHARACTER = "\U0010ffff"
"""A Unicode noncharacter, in no font: what it draws is the font's missing-glyph box."""


@dataclass(frozen=True)
class FrameInfo:
    """The frames a step receives: their size after the steps before it, and the clip's length and rate."""

    width: int
    height: int
    frames: int
    fps: int


class PostStep(Protocol):
    """One stage of the finishing graph. Subclass it explicitly to inherit the identity `output_size`."""

    # Names the step in error messages and in the ffmpeg failure it caused.
    name: ClassVar[str]

    def validate(self) -> None:
        """Raise ValueError naming the bad field in backticks (`step.field`) and showing its value."""
        ...

    def apply(self, video: Video, frame: FrameInfo, workdir: Path) -> Video:
        """Add this step's filters to `video` and return the resulting stream.

        `frame` is the size the filters receive; `workdir` is an empty folder of this step's own for any
        file its filters read (ffmpeg opens them only while the graph runs, and the caller deletes the
        folder afterwards).
        """
        ...

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """Frame size this step's filters produce from `width` x `height` input; the next step sees it."""
        return width, height


@dataclass(frozen=True)
class Watermark(PostStep):
    """What to stamp on each clip: an image file, or text rendered with Pillow when no image is given."""

    name: ClassVar[str] = "watermark"

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
            if len(self.text) > MAX_TEXT_CHARS:
                raise ValueError(
                    f"`watermark.text` is {len(self.text)} characters; the limit is {MAX_TEXT_CHARS} "
                    f"but is {self.text[:40] + '...'!r}"
                )
            # A character without a glyph is drawn as a box: the clip would carry a wrong mark, silently.
            for ch in self.text:
                if not can_draw(ch):
                    raise ValueError(
                        f"`watermark.text` has {ch!r} (U+{ord(ch):04X}), which the watermark font cannot "
                        "draw (it has ASCII letters, digits and punctuation); use `watermark.image` for "
                        f"other characters, but is {self.text!r}"
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

    def apply(self, video: Video, frame: FrameInfo, workdir: Path) -> Video:
        # The mark is sized for the frame as it reaches this step, so a crop before it shrinks it too.
        png = render_watermark_png(
            self, frame_width=frame.width, frame_height=frame.height, dest=workdir / "watermark.png"
        )
        x, y = _corner_position(self.corner, round(self.margin * frame.height))
        # Overlay in RGB so the mark's edges are blended before chroma subsampling, not after.
        return ffmpeg.overlay(video, ffmpeg.input(str(png)), x=x, y=y, format="gbrp")


POST_STEPS: tuple[type[PostStep], ...] = (Watermark,)
"""Every post step type, in the order the finish stage applies them; a new step is one class here and one
entry.

The order matters wherever one step's output is another's input: each step sees the frame as the steps
before it left it. A step that changes the frame (a crop or pad to an aspect ratio) goes before
`Watermark`, so the mark is sized for and placed on the final frame instead of being cut off or left
off-centre by a later crop.
"""


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


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_SIZE)


def _drawn(ch: str) -> tuple[tuple[int, int], bytes]:
    mask = _font().getmask(ch)
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=1024)
def can_draw(ch: str) -> bool:
    """Whether the watermark font has a glyph for character `ch` (a space has one; a tab, a newline,
    an emoji or a CJK character has none and would be drawn as the missing-glyph box)."""
    # Pillow offers no glyph lookup: a character the font lacks draws exactly what a noncharacter does.
    return _drawn(ch) != _drawn(_NO_SUCH_CHARACTER)


def _draw_text(text: str) -> Image.Image:
    # Drawn large and downscaled afterwards: small font sizes hint badly, and the resize lands on the
    # exact target height regardless of the font's ascent/descent.
    stroke = _FONT_SIZE // 12  # dark outline so white text reads on light and dark footage alike
    font = _font()
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
