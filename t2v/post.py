"""Post steps: what the finish stage does to a clip's frames between decoding and each output's encode.

Each step is a frozen dataclass that adds its filters to one shared ffmpeg graph (`media.encode_outputs`
runs each output's steps in list order on its own branch of the decoded frames), so a clip's outputs
are read, processed and encoded in a single ffmpeg process. The steps: `Reframe` (crop or pad to an
aspect ratio), `PickFrame` (a poster's one frame), `Resample` (a preview's width and rate) and
`Watermark`, which comes last so that it is sized for and placed in each output's own frame.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, Protocol, get_args

import ffmpeg
from PIL import Image, ImageColor, ImageDraw, ImageFont

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
Fill = Literal["crop", "pad"]
Focus = Literal["center", "top", "bottom", "left", "right"]
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

    def output_frame(self, frame: FrameInfo) -> FrameInfo:
        """What this step's filters produce from `frame` (size, length, rate); the next step sees it.
        A step that keeps length and rate only overrides `output_size`."""
        width, height = self.output_size(frame.width, frame.height)
        return replace(frame, width=width, height=height)


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


ASPECTS: dict[str, tuple[int, int]] = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1), "4:5": (4, 5)}
"""The aspect ratios (width:height) a clip can be reframed to; an output that keeps the clip's own is
"native" and has no `Reframe`."""
FOCUSES: tuple[str, ...] = get_args(Focus)
FILLS: tuple[str, ...] = get_args(Fill)
_FOCUS_SHARE = {
    "center": (0.5, 0.5),
    "left": (0.0, 0.5),
    "right": (1.0, 0.5),
    "top": (0.5, 0.0),
    "bottom": (0.5, 1.0),
}
"""Where the kept part of a crop (or the clip in a pad) sits: the share of the slack left of it, above it."""
_BLUR_SHRINK = 4
"""A pad's blurred background is blurred at a quarter of the canvas and scaled up: the same look, and
16 times fewer pixels through the blur (the dearest filter of a 9:16 pad, docs/benchmarks.md)."""
_BLUR_SIGMA = 1 / 40
"""Blur radius as a share of the small canvas's long side: enough that the copy reads as a backdrop."""


def reframed_size(aspect: str, fill: Fill, width: int, height: int) -> tuple[int, int]:
    """The frame that a `fill` to `aspect` makes of a width x height one, with even sides (yuv420p).

    A crop keeps the whole of one side and cuts the other; a pad keeps the whole frame and adds to one
    side. Either way the picture keeps its own resolution: nothing is scaled.
    """
    a, b = ASPECTS[aspect]
    wider = width * b > height * a  # wider than the aspect: a crop cuts its sides, a pad adds rows
    if (fill == "crop") == wider:
        new = _even(height * a / b)
        return (min(new, width) if fill == "crop" else max(new, width)), height
    new = _even(width * b / a)
    return width, (min(new, height) if fill == "crop" else max(new, height))


def changed_axis(aspect: str, fill: Fill, width: int, height: int) -> Literal["x", "y"] | None:
    """Which side a reframe changes ("x": the width, "y": the height), None where it changes nothing:
    the one along which a focus chooses."""
    new_width, new_height = reframed_size(aspect, fill, width, height)
    if new_width != width:
        return "x"
    return "y" if new_height != height else None


def focus_applies(focus: str, axis: Literal["x", "y"] | None) -> bool:
    """Whether `focus` means something along `axis`: left and right across, top and bottom up and down."""
    if focus == "center":
        return True
    return axis == ("x" if focus in ("left", "right") else "y")


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


@dataclass(frozen=True)
class Reframe(PostStep):
    """Crop or pad the frame to an aspect ratio, `focus` choosing the part kept (or where the clip sits)."""

    name: ClassVar[str] = "reframe"

    aspect: str = "16:9"
    fill: Fill = "crop"
    focus: Focus = "center"
    background: str = "blur"
    """Behind a pad: "blur" (an enlarged, blurred copy of the clip) or a colour ("black", "#1d2430")."""

    def validate(self) -> None:
        if self.aspect not in ASPECTS:
            raise ValueError(f"`reframe.aspect` must be one of {', '.join(ASPECTS)} but is {self.aspect!r}")
        if self.fill not in FILLS:
            raise ValueError(f"`reframe.fill` must be crop or pad but is {self.fill!r}")
        if self.focus not in FOCUSES:
            raise ValueError(f"`reframe.focus` must be one of {', '.join(FOCUSES)} but is {self.focus!r}")
        if self.background != "blur" and not _is_colour(self.background):
            raise ValueError(
                "`reframe.background` must be blur or a colour (a name or #rrggbb) "
                f"but is {self.background!r}"
            )

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return reframed_size(self.aspect, self.fill, width, height)

    def apply(self, video: Video, frame: FrameInfo, workdir: Path) -> Video:
        width, height = self.output_size(frame.width, frame.height)
        share_x, share_y = _FOCUS_SHARE[self.focus]
        if self.fill == "crop":
            x, y = round((frame.width - width) * share_x), round((frame.height - height) * share_y)
            return video.filter("crop", width, height, x, y)
        x, y = round((width - frame.width) * share_x), round((height - frame.height) * share_y)
        if self.background != "blur":
            red, green, blue = ImageColor.getrgb(self.background)[:3]
            return video.filter("pad", width, height, x, y, color=f"0x{red:02x}{green:02x}{blue:02x}")
        branches = video.split()
        small_w, small_h = _even(width / _BLUR_SHRINK), _even(height / _BLUR_SHRINK)
        back = (
            branches[0]
            .filter("scale", small_w, small_h, force_original_aspect_ratio="increase")
            .filter("crop", small_w, small_h)
            .filter("gblur", sigma=max(small_w, small_h) * _BLUR_SIGMA)
            .filter("scale", width, height)
        )
        return ffmpeg.overlay(back, branches[1], x=x, y=y, format="gbrp")


def _is_colour(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ImageColor.getrgb(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PickFrame(PostStep):
    """Keep one frame of the clip (a poster's), by its index from 0."""

    name: ClassVar[str] = "frame"

    index: int = 0

    def validate(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"`frame.index` must be a whole number >= 0 but is {self.index!r}")

    def apply(self, video: Video, frame: FrameInfo, workdir: Path) -> Video:
        if self.index >= frame.frames:
            raise ValueError(
                f"`frame.index` must be below the clip's {frame.frames} frames but is {self.index!r}"
            )
        # trim counts frames, not seconds, so the pick does not depend on timestamps' rounding.
        return video.trim(start_frame=self.index, end_frame=self.index + 1).setpts("PTS-STARTPTS")

    def output_frame(self, frame: FrameInfo) -> FrameInfo:
        return replace(frame, frames=1)


@dataclass(frozen=True)
class Resample(PostStep):
    """Scale to `width` (the height in proportion, even) and drop frames down to `fps`: a preview's."""

    name: ClassVar[str] = "resample"

    width: int = 320
    fps: int = 12

    def validate(self) -> None:
        for field, low in (("width", 2), ("fps", 1)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`resample.{field}` must be a whole number >= {low} but is {value!r}")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return self.width, _even(height * self.width / width)

    def output_frame(self, frame: FrameInfo) -> FrameInfo:
        width, height = self.output_size(frame.width, frame.height)
        fps = min(self.fps, frame.fps)
        # ffmpeg's fps filter rounds each frame's time to the nearest output slot.
        frames = max(1, math.floor(frame.frames * fps / frame.fps + 0.5))
        return FrameInfo(width=width, height=height, frames=frames, fps=fps)

    def apply(self, video: Video, frame: FrameInfo, workdir: Path) -> Video:
        out = self.output_frame(frame)
        if out.fps < frame.fps:
            video = video.filter("fps", out.fps)
        return video.filter("scale", out.width, out.height, flags="lanczos")


POST_STEPS: tuple[type[PostStep], ...] = (Reframe, PickFrame, Resample, Watermark)
"""Every post step type, in the order the finish stage applies them; a new step is one class here and one
entry.

The order matters wherever one step's output is another's input: each step sees the frame as the steps
before it left it. The steps that change the frame (a crop or pad to an aspect ratio, a poster's frame,
a preview's size) go before `Watermark`, so the mark is sized for and placed on each output's final
frame instead of being cut off or left off-centre by a later crop.
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
