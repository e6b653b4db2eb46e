import struct
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from t2v import media
from t2v.media import (
    FFMPEG,
    H264,
    Animation,
    Codec,
    MediaError,
    Render,
    Still,
    Watermark,
    encode_clip,
    encode_mp4,
    encode_outputs,
    read_frames,
    render_watermark_png,
    write_frames_lossless,
)

OPPOSITE = {
    "top-left": "bottom-right",
    "bottom-right": "top-left",
    "top-right": "bottom-left",
    "bottom-left": "top-right",
}


def _gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    # Smooth mid-tone content: cheap to encode, and white text or a magenta logo stands out on it.
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([60 + x * 80 // width, 60 + y * 80 // height, np.full_like(x, 100)], axis=-1)
    return np.repeat(frame[None].astype(np.uint8), count, axis=0)


def _lossless(tmp_path: Path, frames: np.ndarray, fps: int = 24) -> Path:
    path = tmp_path / "clip.mkv"
    write_frames_lossless(frames, path, fps=fps)
    return path


def _top_level_boxes(path: Path) -> list[bytes]:
    data, boxes, pos = path.read_bytes(), [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:  # 64-bit largesize follows the type
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
        boxes.append(kind)
        pos += size if size else len(data)
    return boxes


def _corner(frames: np.ndarray, corner: str) -> np.ndarray:
    # A third of each side: comfortably holds a mark at scale 0.12-0.25 plus its 3% margin.
    height, width = frames.shape[1:3]
    rows = slice(0, height // 3) if corner.startswith("top") else slice(height - height // 3, height)
    cols = slice(0, width // 3) if corner.endswith("left") else slice(width - width // 3, width)
    return frames[:, rows, cols].astype(np.float64)


def test_lossless_round_trip_is_bit_exact(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(9, 64, 96, 3), dtype=np.uint8)
    back = read_frames(_lossless(tmp_path, frames))
    assert back.dtype == np.uint8
    assert back.shape == frames.shape
    assert np.array_equal(back, frames)


def test_write_frames_lossless_rejects_non_rgb_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`frames`"):
        write_frames_lossless(np.zeros((9, 64, 64), np.uint8), tmp_path / "x.mkv", fps=16)
    with pytest.raises(ValueError, match="`frames`"):
        write_frames_lossless(np.zeros((9, 64, 64, 3), np.float32), tmp_path / "x.mkv", fps=16)


@pytest.mark.parametrize(
    ("frame_count", "height", "width", "fps"), [(9, 64, 64, 16), (17, 96, 160, 24), (17, 63, 65, 24)]
)
def test_encode_clip_stream_properties(
    tmp_path: Path, frame_count: int, height: int, width: int, fps: int
) -> None:
    source = _lossless(tmp_path, _gradient_frames(frame_count, height, width), fps=fps)
    dest = tmp_path / "clip.mp4"
    encode_clip(source, dest, fps=fps, steps=[Watermark()])

    with av.open(str(dest)) as container:
        assert not container.streams.audio
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        # Odd sizes are padded up to even, which yuv420p requires.
        assert (stream.width, stream.height) == (width + width % 2, height + height % 2)
        assert stream.average_rate == fps
        assert sum(1 for _ in container.decode(stream)) == frame_count
    boxes = _top_level_boxes(dest)
    assert boxes.index(b"moov") < boxes.index(b"mdat")


@pytest.fixture(scope="module")
def watermark_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    tmp_path = tmp_path_factory.mktemp("watermark")
    source = _lossless(tmp_path, _gradient_frames(9, 128, 128), fps=16)
    plain = tmp_path / "plain.mp4"
    encode_clip(source, plain, fps=16, steps=[])
    logo = tmp_path / "logo.png"
    Image.new("RGB", (30, 20), (255, 0, 255)).save(logo)
    return source, read_frames(plain), logo


@pytest.mark.parametrize("corner", list(OPPOSITE))
@pytest.mark.parametrize("kind", ["text", "image"])
def test_watermark_lands_in_its_corner(
    tmp_path: Path, watermark_case: tuple[Path, np.ndarray, Path], corner: str, kind: str
) -> None:
    source, plain, logo = watermark_case
    watermark = (
        Watermark(corner=corner, image=logo, scale=0.25) if kind == "image" else Watermark(corner=corner)
    )
    dest = tmp_path / "marked.mp4"
    encode_clip(source, dest, fps=16, steps=[watermark])
    marked = read_frames(dest)

    # Measured on this content: the mark's corner differs by ~10-25 on average (the glyphs/logo cover a
    # tenth or more of the region and move pixels by ~100 levels), while the far corner sees only x264's
    # encode-to-encode jitter on identical smooth content (< 1). 4 and 2 leave margin on both sides.
    assert np.abs(_corner(marked, corner) - _corner(plain, corner)).mean() > 4
    far = OPPOSITE[corner]
    assert np.abs(_corner(marked, far) - _corner(plain, far)).mean() < 2


def test_render_watermark_png_text(tmp_path: Path) -> None:
    dest = render_watermark_png(
        Watermark(opacity=0.5), frame_width=832, frame_height=480, dest=tmp_path / "w.png"
    )
    with Image.open(dest) as im:
        assert im.mode == "RGBA"
        assert im.height == round(0.12 * 480)
        alpha = np.asarray(im.getchannel("A"))
    assert 0 < alpha.max() <= round(0.5 * 255)


def test_render_watermark_png_fits_narrow_frames(tmp_path: Path) -> None:
    mark = Watermark(text="a long watermark that cannot fit", scale=0.5)
    dest = render_watermark_png(mark, frame_width=64, frame_height=64, dest=tmp_path / "w.png")
    with Image.open(dest) as im:
        assert im.width <= 64 - 2 * round(0.03 * 64)


def test_bitrate_cap_bounds_file_size(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).integers(0, 256, size=(49, 256, 256, 3), dtype=np.uint8)
    source = _lossless(tmp_path, frames, fps=24)
    uncapped, capped = tmp_path / "uncapped.mp4", tmp_path / "capped.mp4"
    encode_clip(source, uncapped, fps=24, steps=[], max_bytes=10**9)
    encode_clip(source, capped, fps=24, steps=[], max_bytes=200_000)
    # Noise defeats compression, so without the cap crf 18 lands far above the budget (~2 MB).
    assert uncapped.stat().st_size > 200_000
    assert capped.stat().st_size <= 200_000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corner": "middle"}, r"`watermark.corner` must be one of .* but is 'middle'"),
        ({"opacity": 1.5}, r"`watermark.opacity` .* 1.5"),
        ({"opacity": -0.1}, r"`watermark.opacity` .* -0.1"),
        ({"image": Path("/nonexistent/logo.png")}, r"`watermark.image` .*/nonexistent/logo.png"),
    ],
)
def test_watermark_validate_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Watermark(**kwargs).validate()


def test_watermark_validate_rejects_non_image(tmp_path: Path) -> None:
    fake = tmp_path / "logo.png"
    fake.write_text("not a png")
    with pytest.raises(ValueError, match=r"`watermark.image` .* is not an image"):
        Watermark(image=fake).validate()


def test_watermark_validate_accepts_defaults_and_images(tmp_path: Path) -> None:
    logo = tmp_path / "logo.jpg"
    Image.new("RGB", (8, 8)).save(logo)
    Watermark().validate()
    Watermark(image=logo, corner="top-left", opacity=0.0).validate()


def test_media_error_on_non_video_source(tmp_path: Path) -> None:
    source = tmp_path / "clip.mkv"
    source.write_bytes(b"definitely not a matroska file" * 10)
    with pytest.raises(MediaError, match="Invalid data"):
        encode_clip(source, tmp_path / "out.mp4", fps=16, steps=[])
    with pytest.raises(MediaError, match="Invalid data"):
        read_frames(source)


def test_encode_mp4_is_encode_clip_with_the_watermark_as_only_step(tmp_path: Path) -> None:
    source = _lossless(tmp_path, _gradient_frames(9, 64, 96), fps=16)
    for watermark, steps in [(Watermark(corner="top-left"), [Watermark(corner="top-left")]), (None, [])]:
        old, new = tmp_path / "old.mp4", tmp_path / "new.mp4"
        encode_mp4(source, old, fps=16, watermark=watermark)
        encode_clip(source, new, fps=16, steps=steps)
        # x264 is deterministic for one graph and one thread count, so equal graphs give equal bytes.
        assert old.read_bytes() == new.read_bytes()


def test_default_codec_round_trips_and_encodes(tmp_path: Path) -> None:
    assert isinstance(FFMPEG, Codec)
    frames = np.random.default_rng(2).integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    FFMPEG.write_frames(frames, tmp_path / "frames.mkv", fps=16)
    assert np.array_equal(FFMPEG.read_frames(tmp_path / "frames.mkv"), frames)
    FFMPEG.encode_clip(tmp_path / "frames.mkv", tmp_path / "a.mp4", fps=16, steps=[Watermark()])
    encode_clip(tmp_path / "frames.mkv", tmp_path / "b.mp4", fps=16, steps=[Watermark()])
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_default_codec_reaches_patched_module_functions(tmp_path: Path, monkeypatch) -> None:
    # Tests (and benchmarks that still patch) replace the module functions; the default codec must see that.
    calls = []
    monkeypatch.setattr(media, "write_frames_lossless", lambda frames, dest, *, fps: calls.append(("w", fps)))
    monkeypatch.setattr(media, "read_frames", lambda path: calls.append(("r", path)))
    monkeypatch.setattr(media, "encode_clip", lambda *a, **k: calls.append(("e", k["steps"])))
    monkeypatch.setattr(media, "encode_outputs", lambda source, renders, *, fps: calls.append(("o", renders)))
    FFMPEG.write_frames(np.zeros((1, 2, 2, 3), np.uint8), tmp_path / "x.mkv", fps=7)
    FFMPEG.read_frames(tmp_path / "x.mkv")
    FFMPEG.encode_clip(tmp_path / "x.mkv", tmp_path / "x.mp4", fps=7, steps=[], max_bytes=10)
    FFMPEG.encode_outputs(tmp_path / "x.mkv", [], fps=7)
    assert calls == [("w", 7), ("r", tmp_path / "x.mkv"), ("e", []), ("o", [])]


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        (H264(max_bytes=0), r"`mp4.max_bytes` must be a positive whole number but is 0"),
        (Still(format="png"), r"`poster.format` must be jpeg or webp but is 'png'"),
        (Animation(format="apng"), r"`preview.format` must be webp or gif but is 'apng'"),
        (Animation(max_bytes=-5), r"`preview.max_bytes` must be a positive whole number but is -5"),
    ],
)
def test_a_bad_encoding_is_rejected_before_ffmpeg_runs(
    tmp_path: Path, monkeypatch, encoding, message
) -> None:
    monkeypatch.setattr(
        media, "ffmpeg_exe", lambda: pytest.fail("ffmpeg ran before the encodings were checked")
    )
    renders = [Render(tmp_path / "a.mp4", (Watermark(),), H264()), Render(tmp_path / "b", (), encoding)]
    with pytest.raises(ValueError, match=message):
        encode_outputs(tmp_path / "missing.mkv", renders, fps=16)


def test_a_still_and_an_animation_name_their_files_and_leaner_versions() -> None:
    assert (Still().suffix, Still(format="webp").suffix, Still().media_type) == (
        ".jpg",
        ".webp",
        "image/jpeg",
    )
    assert (Animation().suffix, Animation(format="gif").media_type) == (".webp", "image/gif")
    assert Animation(quality=75).leaner() == Animation(quality=50)
    assert Animation(format="gif", colors=64).leaner() == Animation(format="gif", colors=32)
    assert Animation(format="gif", colors=32).leaner() is None and H264().leaner() is None
