"""Post steps in the finishing graph: order, frame sizes passed along, validation, temporary files."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from t2v import media
from t2v.media import POST_STEPS, FrameInfo, MediaError, PostStep, Watermark, encode_clip, read_frames
from t2v.media import write_frames_lossless as write_lossless
from t2v.post import MAX_TEXT_CHARS, PickFrame, Reframe, Resample

HEIGHT, WIDTH, FPS, FRAMES = 96, 128, 16, 9


@dataclass(frozen=True)
class Box(PostStep):
    """Fills a rectangle with one colour: an effect that is easy to find in decoded frames."""

    name: ClassVar[str] = "box"
    color: str = "red"
    x: int = 0
    y: int = 0
    w: int = 32
    h: int = 32

    def validate(self) -> None:
        if self.w <= 0 or self.h <= 0:
            raise ValueError(f"`box.w` and `box.h` must be positive but are {self.w!r} and {self.h!r}")

    def apply(self, video, frame: FrameInfo, workdir: Path):
        return video.filter("drawbox", x=self.x, y=self.y, w=self.w, h=self.h, color=self.color, t="fill")


@dataclass(frozen=True)
class CropLeft(PostStep):
    """Keeps the left `share` of the frame, as a crop-to-aspect step would: it changes the frame size."""

    name: ClassVar[str] = "crop-left"
    share: float = 0.5

    def validate(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"`crop-left.share` must be within (0, 1] but is {self.share!r}")

    def apply(self, video, frame: FrameInfo, workdir: Path):
        width, height = self.output_size(frame.width, frame.height)
        return video.filter("crop", width, height, 0, 0)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return round(width * self.share), height


@dataclass(frozen=True)
class Recorder(PostStep):
    """Adds no filter; notes what encode_clip handed it."""

    name: ClassVar[str] = "recorder"
    seen: list = field(default_factory=list)

    def validate(self) -> None:
        pass

    def apply(self, video, frame: FrameInfo, workdir: Path):
        self.seen.append((frame, workdir, workdir.is_dir() and not any(workdir.iterdir())))
        return video


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Smooth mid-tone gradient (R, G in 60..140, B 100): pure red, blue or magenta stand out on it.
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frame = np.stack([60 + x * 80 // WIDTH, 60 + y * 80 // HEIGHT, np.full_like(x, 100)], axis=-1)
    path = tmp_path_factory.mktemp("post") / "clip.mkv"
    write_lossless(np.repeat(frame[None].astype(np.uint8), FRAMES, axis=0), path, fps=FPS)
    return path


@pytest.fixture(scope="module")
def logo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logo") / "logo.png"
    Image.new("RGB", (40, 20), (255, 0, 255)).save(path)
    return path


def _encode(source: Path, dest: Path, *steps: PostStep) -> np.ndarray:
    encode_clip(source, dest, fps=FPS, steps=steps)
    return read_frames(dest).astype(np.int64)


def _magenta(frames: np.ndarray) -> np.ndarray:
    """(H, W) mask of the logo's pixels in the middle frame."""
    r, g, b = np.moveaxis(frames[len(frames) // 2], -1, 0)
    return (r > 180) & (g < 100) & (b > 180)


def _mean_color(frames: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    return frames[:, rows, cols].reshape(-1, 3).mean(axis=0)


def test_the_watermark_comes_after_every_step_that_changes_the_frame() -> None:
    # So that it is sized for and placed in each output's own frame (a 9:16 crop's corner).
    assert POST_STEPS == (Reframe, PickFrame, Resample, Watermark)
    assert Watermark.name == "watermark"
    assert len({step.name for step in POST_STEPS}) == len(POST_STEPS)


def test_a_second_step_runs_in_the_same_graph_after_the_watermark(tmp_path: Path, source: Path) -> None:
    plain = _encode(source, tmp_path / "plain.mp4")
    both = _encode(source, tmp_path / "both.mp4", Watermark(corner="bottom-right"), Box(color="red"))

    # Inside the box (a few pixels in from its edges, which chroma subsampling blurs) the frame is red.
    red = _mean_color(both, slice(4, 28), slice(4, 28))
    assert red[0] > 230 and red[1] < 30 and red[2] < 30
    # The watermark is still there in its own corner, where the box is not.
    corner = np.s_[:, HEIGHT * 2 // 3 :, WIDTH * 2 // 3 :]
    assert np.abs(both[corner] - plain[corner]).mean() > 4


def test_steps_run_in_list_order(tmp_path: Path, source: Path, logo: Path) -> None:
    mark = Watermark(image=logo, corner="bottom-right", scale=0.25, opacity=1.0)
    # A box over the watermark's corner, drawn after it, hides it; drawn before it, the mark lands on top.
    box = Box(color="blue", x=WIDTH // 2, y=HEIGHT // 2, w=WIDTH // 2, h=HEIGHT // 2)
    hidden = _encode(source, tmp_path / "hidden.mp4", mark, box)
    shown = _encode(source, tmp_path / "shown.mp4", box, mark)

    assert not _magenta(hidden).any()
    assert _magenta(shown).sum() > 0.5 * 32 * 16  # the 32x16 logo, less its blurred edge
    # Two overlapping boxes: the later one wins.
    red_then_blue = _encode(source, tmp_path / "rb.mp4", Box(color="red"), Box(color="blue"))
    blue_then_red = _encode(source, tmp_path / "br.mp4", Box(color="blue"), Box(color="red"))
    inside = slice(4, 28)
    assert _mean_color(red_then_blue, inside, inside)[2] > 200
    assert _mean_color(blue_then_red, inside, inside)[0] > 200


def test_a_step_sees_the_frame_size_left_by_the_steps_before_it(
    tmp_path: Path, source: Path, logo: Path
) -> None:
    before, after = Recorder(), Recorder()
    # Image watermarks are scale x frame width wide: 0.5 of the cropped 64 px is 32 px, not 64.
    mark = Watermark(image=logo, corner="bottom-right", scale=0.5, opacity=1.0)
    frames = _encode(source, tmp_path / "cropped.mp4", before, CropLeft(0.5), after, mark)

    assert [seen[0] for seen in before.seen] == [FrameInfo(WIDTH, HEIGHT, FRAMES, FPS)]
    assert [seen[0] for seen in after.seen] == [FrameInfo(WIDTH // 2, HEIGHT, FRAMES, FPS)]
    assert frames.shape[1:3] == (HEIGHT, WIDTH // 2)
    rows, cols = np.nonzero(_magenta(frames))
    margin = round(0.03 * HEIGHT)
    # Sized and placed for the 64 px frame: 32 px wide, `margin` in from the right and bottom edges
    # (give or take the pixel that chroma subsampling blurs at each edge).
    assert abs((cols.max() - cols.min() + 1) - 32) <= 2
    assert abs(cols.max() - (WIDTH // 2 - 1 - margin)) <= 1
    assert abs(rows.max() - (HEIGHT - 1 - margin)) <= 1
    # The same watermark before the crop is sized for and placed on the full frame (64 px wide, ending
    # `margin` from its right edge), so the crop keeps only its first `margin` columns.
    _, cols = np.nonzero(_magenta(_encode(source, tmp_path / "cut.mp4", mark, CropLeft(0.5))))
    assert cols.min() >= WIDTH // 2 - margin - 1


def test_each_step_gets_its_own_empty_workdir_which_is_deleted_afterwards(
    tmp_path: Path, source: Path
) -> None:
    first, second = Recorder(), Recorder()
    encode_clip(source, tmp_path / "clip.mp4", fps=FPS, steps=[first, Watermark(), second])
    (_, dir_a, empty_a), (_, dir_b, empty_b) = first.seen[0], second.seen[0]
    assert empty_a and empty_b and dir_a != dir_b
    assert not dir_a.parent.exists()
    # Nothing is left beside the clip either (the store's folder holds only finished files).
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_workdir_is_deleted_when_ffmpeg_fails(tmp_path: Path, source: Path) -> None:
    recorder = Recorder()
    with pytest.raises(MediaError, match="post steps: recorder, watermark, box"):
        encode_clip(
            source, tmp_path / "clip.mp4", fps=FPS, steps=[recorder, Watermark(), Box(color="nocolor")]
        )
    assert not recorder.seen[0][1].parent.exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Watermark(opacity=2.0), r"`watermark.opacity` .* 2.0"),
        (Box(w=0), r"`box.w` .* 0 "),
        (CropLeft(share=1.5), r"`crop-left.share` .* 1.5"),
        (Reframe(aspect="3:2"), r"`reframe.aspect` must be one of 16:9, 9:16, 1:1, 4:5 but is '3:2'"),
        (Reframe(fill="stretch"), r"`reframe.fill` must be crop or pad but is 'stretch'"),
        (Reframe(background="mauvish"), r"`reframe.background` must be blur or a colour .* 'mauvish'"),
        (PickFrame(index=-1), r"`frame.index` must be a whole number >= 0 but is -1"),
        (Resample(fps=0), r"`resample.fps` must be a whole number >= 1 but is 0"),
    ],
)
def test_a_bad_step_is_rejected_before_ffmpeg_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: PostStep, message: str
) -> None:
    def no_ffmpeg() -> str:
        raise AssertionError("ffmpeg ran before the steps were validated")

    monkeypatch.setattr(media, "ffmpeg_exe", no_ffmpeg)
    recorder = Recorder()
    # The source does not even exist: validation comes before the probe.
    with pytest.raises(ValueError, match=message):
        encode_clip(
            tmp_path / "missing.mkv", tmp_path / "clip.mp4", fps=FPS, steps=[recorder, Watermark(), bad]
        )
    assert recorder.seen == []
    assert not (tmp_path / "clip.mp4").exists()


def test_a_step_that_leaves_no_picture_is_rejected(tmp_path: Path, source: Path) -> None:
    with pytest.raises(ValueError, match=r"post step `crop-left` turns 128x96 frames into 0x96"):
        encode_clip(source, tmp_path / "clip.mp4", fps=FPS, steps=[CropLeft(share=0.001)])


def test_a_frame_past_the_clips_end_is_rejected_before_ffmpeg_encodes(tmp_path: Path, source: Path) -> None:
    with pytest.raises(ValueError, match=r"`frame.index` must be below the clip's 9 frames but is 9"):
        encode_clip(source, tmp_path / "clip.mp4", fps=FPS, steps=[PickFrame(FRAMES)])
    assert not (tmp_path / "clip.mp4").exists()


def test_steps_that_change_length_and_rate_tell_the_next_step() -> None:
    clip = FrameInfo(width=832, height=480, frames=81, fps=24)
    assert PickFrame(40).output_frame(clip) == FrameInfo(832, 480, 1, 24)
    assert Resample(width=320, fps=12).output_frame(clip) == FrameInfo(320, 184, 41, 12)
    assert Resample(width=320, fps=30).output_frame(clip) == FrameInfo(320, 184, 81, 24)  # never more frames
    assert Reframe("9:16").output_frame(clip) == FrameInfo(270, 480, 81, 24)
    assert CropLeft(0.5).output_frame(clip) == FrameInfo(416, 480, 81, 24)  # from output_size alone


# --- what watermark text may hold: only what the font draws, and not too much of it ----------------


@pytest.mark.parametrize(
    ("text", "char"),
    [
        ("fox \U0001f98a", "U+1F98A"),
        ("夜景", "U+591C"),
        ("café", "U+00E9"),
        ("a\tb", "U+0009"),
        ("a\nb", "U+000A"),
    ],
)
def test_watermark_text_the_font_cannot_draw_is_refused(text: str, char: str) -> None:
    # Pillow would draw each of these as the font's missing-glyph box, and the clip would be published.
    with pytest.raises(ValueError, match=r"^`watermark\.text` has ") as caught:
        Watermark(text=text).validate()
    message = str(caught.value)
    assert char in message and "`watermark.image`" in message and repr(text) in message


@pytest.mark.parametrize("text", ["t2v", "Night shift #3 (c) 2026", "© t2v™", "x" * MAX_TEXT_CHARS])
def test_watermark_text_the_font_draws_is_accepted_and_drawn(text: str, tmp_path: Path) -> None:
    mark = Watermark(text=text)
    mark.validate()
    png = media.render_watermark_png(mark, frame_width=WIDTH, frame_height=HEIGHT, dest=tmp_path / "m.png")
    with Image.open(png) as im:
        assert im.getchannel("A").getbbox() is not None


def test_watermark_text_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"`watermark\.text` is 65 characters; the limit is 64"):
        Watermark(text="x" * 65).validate()


def test_an_image_watermark_ignores_the_text(logo: Path) -> None:
    Watermark(text="\U0001f98a" * 100, image=logo).validate()  # the text is not drawn, so not checked
