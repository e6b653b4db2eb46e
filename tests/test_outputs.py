"""Outputs for the platforms: aspects, poster, preview, in one ffmpeg run; their keys, store and publishing.

Every file is read back by a decoder that is not ffmpeg's command line: PyAV for video, Pillow for
posters and previews.
"""

from __future__ import annotations

import struct
from dataclasses import asdict
from datetime import date
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from flows.nightly import nightly
from t2v import media
from t2v.encodings import H264, Animation, Still
from t2v.jobs import Catalogue, JobSpec
from t2v.media import MediaError, Render, Watermark, encode_outputs, write_frames_lossless
from t2v.models.registry import resolve_model
from t2v.outputs import Output, Poster, Preview, made_of
from t2v.pipeline import JobKeys, KeyInputs, decode, finish, stages
from t2v.post import PickFrame, Reframe, Resample, changed_axis, reframed_size
from t2v.rerun import Night
from t2v.runlog import RunLog, sqlite_url
from t2v.store import make_key

W, H, FRAMES, FPS = 128, 96, 9, 16
RED, BLUE = (200, 40, 40), (40, 40, 200)


# --- geometry -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aspect", "fill", "size", "expected", "axis"),
    [
        ("9:16", "crop", (832, 480), (270, 480), "x"),
        ("16:9", "crop", (832, 480), (832, 468), "y"),
        ("4:5", "crop", (832, 480), (384, 480), "x"),
        ("1:1", "pad", (832, 480), (832, 832), "y"),
        ("9:16", "pad", (832, 480), (832, 1480), "y"),
        ("16:9", "crop", (1280, 704), (1252, 704), "x"),
        ("16:9", "pad", (1280, 720), (1280, 720), None),
    ],
)
def test_a_reframe_keeps_the_pictures_resolution_and_says_which_side_changes(
    aspect: str, fill: str, size: tuple[int, int], expected: tuple[int, int], axis: str | None
) -> None:
    assert reframed_size(aspect, fill, *size) == expected
    assert changed_axis(aspect, fill, *size) == axis


# --- one ffmpeg run, read back by PyAV and Pillow ---------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Left half red, right half blue, and a white bar that moves across: every frame differs."""
    frames = np.zeros((FRAMES, H, W, 3), np.uint8)
    frames[:, :, : W // 2] = RED
    frames[:, :, W // 2 :] = BLUE
    for i in range(FRAMES):
        frames[i, 40:56, i * 12 : i * 12 + 12] = 255
    path = tmp_path_factory.mktemp("outputs") / "frames.mkv"
    write_frames_lossless(frames, path, fps=FPS)
    return path, frames


def _video(path: Path) -> tuple[str, str, int, int, int, float, np.ndarray]:
    """(codec, pixel format, width, height, frames, fps, RGB frames) as PyAV decodes the file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rgb = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        ctx = stream.codec_context
        return (
            ctx.name,
            ctx.pix_fmt,
            stream.width,
            stream.height,
            len(rgb),
            float(stream.average_rate),
            np.stack(rgb),
        )


def _moov_first(path: Path) -> bool:
    data, boxes, pos = path.read_bytes(), [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        boxes.append(kind)
        pos += size
    return boxes.index(b"moov") < boxes.index(b"mdat")


def test_every_output_comes_from_one_ffmpeg_run_and_decodes_as_asked(
    tmp_path: Path, source: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, frames = source
    runs: list[str] = []
    real_run = media._run
    monkeypatch.setattr(
        media, "_run", lambda stream, what, **kw: runs.append(what) or real_run(stream, what, **kw)
    )
    renders = {
        "native": Render(tmp_path / "native.mp4", (), H264()),
        "9x16": Render(tmp_path / "9x16.mp4", (Reframe("9:16", focus="left"),), H264()),
        "1x1": Render(tmp_path / "1x1.mp4", (Reframe("1:1", "pad", background="#00ff00"),), H264()),
        "4x5": Render(tmp_path / "4x5.mp4", (Reframe("4:5", "pad", focus="top"),), H264()),
        "poster": Render(tmp_path / "poster.jpg", (PickFrame(FRAMES - 1),), Still()),
        "webp": Render(tmp_path / "preview.webp", (Resample(64, 8),), Animation("webp")),
        "gif": Render(tmp_path / "preview.gif", (Resample(64, 8),), Animation("gif")),
    }

    encode_outputs(path, list(renders.values()), fps=FPS)

    assert [what for what in runs if what.startswith("encode")] == [runs[-1]]  # one encode for all seven
    sizes = {"native": (W, H), "9x16": (54, 96), "1x1": (128, 128), "4x5": (128, 160)}
    for name, (width, height) in sizes.items():
        dest = renders[name].dest
        codec, pix_fmt, w, h, count, fps, rgb = _video(dest)
        assert (codec, pix_fmt, w, h, count, fps) == ("h264", "yuv420p", width, height, FRAMES, FPS)
        assert 0 < dest.stat().st_size <= H264().max_bytes and _moov_first(dest)
    # The left-focused 9:16 crop keeps the red half; the colour pad is green above and below the clip.
    *_, crop = _video(renders["9x16"].dest)
    assert np.abs(crop[:, 4:36, 4:50].reshape(-1, 3).mean(0) - RED).max() < 12
    *_, square = _video(renders["1x1"].dest)
    assert np.abs(square[:, 2:12].reshape(-1, 3).mean(0) - (0, 255, 0)).max() < 12
    assert np.abs(square[:, 118:126].reshape(-1, 3).mean(0) - (0, 255, 0)).max() < 12
    # A top-focused pad puts the clip at the top; the blurred copy of it fills the rows below.
    *_, tall = _video(renders["4x5"].dest)
    assert np.abs(tall[:, 4:90, 4:60].reshape(-1, 3).mean(0) - RED).max() < 12
    below = tall[:, 110:150].astype(float)
    assert below.std() > 10 and below[..., 0].mean() > 40 and below[..., 2].mean() > 40

    with Image.open(renders["poster"].dest) as poster:
        assert (poster.format, poster.size, getattr(poster, "n_frames", 1)) == ("JPEG", (W, H), 1)
        # The last frame's bar, not the first's: it sits at x 96..108.
        bar = np.asarray(poster.convert("RGB"))[42:54]
    assert bar[:, 98:106].mean() > 230 and bar[:, 2:10].mean() < 150
    for fmt in ("webp", "gif"):
        dest = renders[fmt].dest
        with Image.open(dest) as preview:
            assert (preview.format, preview.size) == (fmt.upper(), (64, 48))
            # 9 frames at 16 fps are 0.56 s: at 8 fps that is 5 frames, looped forever (loop 0).
            assert (preview.n_frames, preview.info["loop"]) == (5, 0)
        assert dest.stat().st_size <= Animation().max_bytes


def test_the_watermark_is_placed_in_each_outputs_own_frame(
    tmp_path: Path, source: tuple[Path, np.ndarray]
) -> None:
    path, _ = source
    logo = tmp_path / "logo.png"
    Image.new("RGB", (20, 10), (255, 0, 255)).save(logo)
    mark = Watermark(image=logo, corner="bottom-right", scale=0.25, opacity=1.0)
    native, crop = tmp_path / "native.mp4", tmp_path / "crop.mp4"
    encode_outputs(
        path,
        [Render(native, (mark,), H264()), Render(crop, (Reframe("9:16", focus="left"), mark), H264())],
        fps=FPS,
    )
    margin = round(0.03 * H)
    for dest, width in ((native, W), (crop, 54)):
        *_, rgb = _video(dest)
        r, g, b = np.moveaxis(rgb[FRAMES // 2].astype(int), -1, 0)
        rows, cols = np.nonzero((r > 180) & (g < 100) & (b > 180))
        # A quarter of this frame's own width, `margin` in from its own bottom-right corner.
        assert abs((cols.max() - cols.min() + 1) - round(0.25 * width)) <= 2
        assert abs(cols.max() - (width - 1 - margin)) <= 1 and abs(rows.max() - (H - 1 - margin)) <= 1


def test_a_preview_over_its_cap_is_made_leaner_until_it_fits_or_fails(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(FRAMES, 64, 96, 3), dtype=np.uint8)
    path = tmp_path / "noise.mkv"
    write_frames_lossless(noise, path, fps=FPS)
    full, capped = tmp_path / "full.webp", tmp_path / "capped.webp"
    encode_outputs(path, [Render(full, (), Animation("webp", max_bytes=10**9))], fps=FPS)
    cap = full.stat().st_size * 3 // 4  # noise at quality 75 does not fit; a lower quality does
    encode_outputs(path, [Render(capped, (), Animation("webp", max_bytes=cap))], fps=FPS)
    assert capped.stat().st_size <= cap
    with Image.open(capped) as im:
        assert im.n_frames == FRAMES
    with pytest.raises(MediaError, match=r"over the 2000 byte cap"):
        encode_outputs(path, [Render(tmp_path / "x.webp", (), Animation("webp", max_bytes=2000))], fps=FPS)


# --- the job's fields -------------------------------------------------------------------------------


def test_the_catalogue_syntax_and_its_richer_forms(write_catalogue) -> None:
    catalogue = write_catalogue(
        {"name": "fox", "prompt": "a fox", "outputs": ["native", "9:16", "1:1"], "poster": "middle"},
        {
            "name": "sea",
            "prompt": "the sea",
            "fill": "pad",
            "background": "black",
            "outputs": ["9:16", "native"],
            "poster.frame": "last",
            "poster.format": "webp",
            "preview.format": "gif",
            "preview.width": 48,
        },
        preview="webp",
    )
    fox, sea = Catalogue.from_file(catalogue, resolve_model("tiny").rules).jobs
    assert fox.outputs == (Output("native"), Output("9:16"), Output("1:1"))
    assert (fox.poster, fox.preview) == (Poster("middle"), Preview("webp"))
    assert [(m.name, m.tail) for m in made_of(fox)] == [
        ("native", ".mp4"),
        ("9x16", ".9x16.mp4"),
        ("1x1", ".1x1.mp4"),
        ("poster", ".poster.jpg"),
        ("preview", ".preview.webp"),
    ]
    assert made_of(fox)[3].steps[0] == PickFrame(4)  # the middle of 9 frames
    assert (sea.poster, sea.preview) == (Poster("last", "webp"), Preview("gif", width=48))
    first = made_of(sea)[0]
    assert (first.name, first.tail, first.steps[0]) == (
        "9x16",
        ".9x16.mp4",
        Reframe("9:16", "pad", "center", "black"),
    )
    assert [m.tail for m in made_of(sea)][-2:] == [".poster.webp", ".preview.gif"]
    # What a re-run reads back from the run log is the same job.
    night = Night(jobs=(fox, sea), outputs_dir=catalogue.parent)
    assert Night.from_json(night.to_json()) == night


def _keys(job: JobSpec) -> JobKeys:
    return JobKeys.of(stages(), KeyInputs(job, resolve_model("tiny")))


def test_a_job_with_only_the_native_clip_keeps_its_key_and_each_output_has_its_own() -> None:
    job = JobSpec(template="fox", prompt="a fox")
    keys = _keys(job)
    # The finish key as it was before outputs existed: stores written then are skipped, not remade.
    before = make_key(
        "watermark",
        fps=job.fps,
        watermark=asdict(job.watermark),
        max_bytes=20_000_000,
        frames=keys[decode.STAGE],
    )
    assert keys[finish.STAGE] == before
    assert [(s.key, s.kind.suffix) for s in finish.stored(job, keys)] == [(before, ".mp4")]

    more = JobSpec(template="fox", prompt="a fox", outputs=("native", "9:16"), poster="first")
    more_keys = _keys(more)
    stored = finish.stored(more, more_keys)
    assert stored[0].key == before  # the native MP4 is the same file
    assert more_keys[finish.STAGE] not in {s.key for s in stored} | {before}  # the manifest's key
    # Each output's key holds its steps: another focus or watermark is another file, the others stay.
    other = finish.stored(
        JobSpec(template="fox", prompt="a fox", outputs=("native", "9:16"), focus="left", poster="first"),
        more_keys,
    )
    assert [s.key == t.key for s, t in zip(stored, other, strict=True)] == [True, False, True]
    marked = finish.stored(
        JobSpec(
            template="fox",
            prompt="a fox",
            outputs=("native", "9:16"),
            poster="first",
            watermark=Watermark(text="x"),
        ),
        more_keys,
    )
    assert all(s.key != t.key for s, t in zip(stored, marked, strict=True))


# --- nights: a re-run skips what exists; an output added later is the only thing made ---------------


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _statuses(data_dir: Path, run_id: str) -> dict[str, str]:
    run = RunLog(sqlite_url(data_dir / "runlog.sqlite")).run(run_id)
    return {r["stage"]: r["status"] for r in run["stages"]}


def test_an_output_added_later_is_made_alone_and_published_beside_the_untouched_clip(
    data_dir: Path, write_catalogue
) -> None:
    fox = {"name": "fox", "prompt": "a red fox running through snow", "seed": 3}
    first = nightly(str(write_catalogue(fox)), "tiny")
    night = data_dir / "outputs" / date.today().isoformat()
    assert first["clips"] == {"fox": str(night / "fox.mp4")}
    store = data_dir / "store"
    clip_before, published_before = _files(store), _files(night)

    catalogue = write_catalogue(fox | {"outputs": ["native", "9:16"], "poster": "middle"})
    second = nightly(str(catalogue), "tiny")

    assert second["failed"] == {} and second["clips"] == first["clips"]
    statuses = _statuses(data_dir, second["run_id"])
    assert statuses == {"encode": "skipped", "diffuse": "skipped", "decode": "skipped", "finish": "ok"}
    after = _files(store)
    assert {p: after[p] for p in clip_before} == clip_before  # nothing stored was touched
    made = sorted(p.name.split(".", 1)[1] for p in set(after) - set(clip_before))
    assert made == ["jpg", "jpg.sha256", "mp4", "mp4.sha256", "outputs.json", "outputs.json.sha256"]
    assert _files(night)[night / "fox.mp4"] == published_before[night / "fox.mp4"]
    assert _video(night / "fox.9x16.mp4")[:6] == ("h264", "yuv420p", 36, 64, 9, 24)
    with Image.open(night / "fox.poster.jpg") as poster:
        assert (poster.format, poster.size) == ("JPEG", (96, 64))

    # A preview added, and the stored poster damaged: those two are made, nothing else.
    poster_file = next(p for p in after if p.suffix == ".jpg")
    poster_file.write_bytes(b"not a jpeg")
    with_preview = fox | {"outputs": ["native", "9:16"], "poster": "middle", "preview.width": 48}
    third = nightly(str(write_catalogue(with_preview)), "tiny")
    assert third["failed"] == {}
    rows = RunLog(sqlite_url(data_dir / "runlog.sqlite")).run(third["run_id"])["stages"]
    assert [(r["stage"], r["status"]) for r in rows if r["stage"] == "finish"] == [
        ("finish", "failed"),
        ("finish", "ok"),
    ]
    now = _files(store)
    kept = {p for p in after if p.suffix in (".mp4", ".mkv", ".safetensors")}
    assert {p: now[p] for p in kept} == {p: after[p] for p in kept}
    with Image.open(poster_file) as poster:
        assert poster.format == "JPEG"
    with Image.open(night / "fox.preview.webp") as preview:
        assert (preview.size, preview.n_frames, preview.info["loop"]) == ((48, 32), 5, 0)

    fourth = nightly(str(write_catalogue(with_preview)), "tiny")
    assert set(_statuses(data_dir, fourth["run_id"]).values()) == {"skipped"}
    assert _files(store) == now


def test_generate_makes_the_outputs_it_is_asked_for_the_first_being_the_clip(data_dir: Path) -> None:
    from typer.testing import CliRunner

    from t2v_cli.main import app

    args = ["generate", "a red fox", "--height", "32", "--width", "64", "--frames", "5", "--steps", "1"]
    args += ["--outputs", "9:16,native", "--fill", "pad", "--background", "black", "--poster", "last"]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    clip = Path(result.stdout.strip())
    assert clip.name.endswith(".9x16.mp4") and clip.parent == data_dir / "outputs" / "generate"
    name = clip.name.removesuffix(".9x16.mp4")
    assert _video(clip)[2:5] == (64, 114, 5)  # 64 wide, padded to 9:16
    assert _video(clip.with_name(f"{name}.mp4"))[2:5] == (64, 32, 5)  # the native one, not overwritten
    with Image.open(clip.with_name(f"{name}.poster.jpg")) as poster:
        assert poster.size == (64, 32)
    # Made again: the same files, a re-run that makes nothing and replaces nothing (no --force needed).
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.stdout == result.stdout
