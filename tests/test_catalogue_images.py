"""The shipped catalogue's image templates and their pictures, and the output checks of an image job
run on the size its picture settles (t2v.images.size_for_picture), not the one it was written with."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import flows.generate
import flows.nightly
import t2v.models.registry
from t2v import images
from t2v.errors import CatalogueError
from t2v.jobs import Catalogue
from t2v.models.wan22 import WAN22_RULES
from t2v_cli.main import app

DATA = Path(__file__).resolve().parents[1] / "data"


# --- the shipped catalogue --------------------------------------------------------------------------


def test_the_shipped_catalogue_has_a_product_teaser_and_a_greeting_card_from_small_drawings():
    jobs = {job.template: job for job in Catalogue.from_file(DATA / "templates.toml", WAN22_RULES).jobs}
    teaser, card = jobs["product-box-teaser"], jobs["greeting-card"]
    assert Path(teaser.image) == DATA / "images" / "product-box.png"
    assert Path(card.image) == DATA / "images" / "greeting-card.png"
    # The 4:3 box at the [defaults] 448x256 area keeps its aspect; the portrait card is padded.
    assert (teaser.width, teaser.height, teaser.fit) == (384, 288, "crop")
    assert (card.width, card.height, card.fit) == (448, 256, "pad")
    assert [j.template for j in jobs.values() if j.image is None] == [
        "birthday-greeting",
        "holiday-card",
        "classroom-atom",
        "product-teaser",
        "nature-loop",
        "paper-crane",
    ]
    for job, colours in ((teaser, {(240, 132, 40), (255, 255, 255)}), (card, {(214, 30, 60)})):
        path = Path(job.image)
        assert path.stat().st_size < 8_000, path  # committed: a few KB each
        pixels = images.read_picture(path).pixels
        used = {colour for _, colour in pixels.getcolors(maxcolors=256) or []}
        # Flat drawings, not noise: at most the script's 32 colours, its box and label, its heart.
        assert 0 < len(used) <= 32 and colours <= used, path


def test_the_drawing_script_makes_both_pictures(tmp_path):
    script = runpy.run_path(str(DATA / "images" / "draw_pictures.py"))
    written = script["main"](tmp_path)
    assert [p.name for p in written] == ["product-box.png", "greeting-card.png"]
    for path in written:
        with Image.open(path) as new, Image.open(DATA / "images" / path.name) as shipped:
            assert (new.format, new.size, new.mode) == ("PNG", shipped.size, "P")


# --- output checks on the final size ---------------------------------------------------------------


def _catalogue(folder: Path, template: str) -> Path:
    """[defaults] give a landscape 128x64 area; `tall.png` beside the catalogue is 180x400, which at
    that area gives a 64x128 clip."""
    Image.new("RGB", (180, 400), (30, 120, 200)).save(folder / "tall.png")
    path = folder / "templates.toml"
    path.write_text(
        "[defaults]\nheight = 64\nwidth = 128\nframes = 9\nsteps = 2\n\n"
        f'[[template]]\nname = "tall"\nprompt = "p"\nimage = "tall.png"\n{template}\n'
    )
    return path


def test_a_focus_is_checked_on_the_size_the_picture_gives(tmp_path):
    # On the written 128x64 a 9:16 crop cuts the sides, so `top` would not apply; the picture makes
    # the clip 64x128, whose 9:16 crop cuts top and bottom, so it does.
    job = Catalogue.from_file(_catalogue(tmp_path, 'outputs = ["9:16"]\nfocus = "top"'), WAN22_RULES).jobs[0]
    assert (job.width, job.height, job.focus) == (64, 128, "top")
    # The same focus on a frame of the template's own stays refused, naming the template.
    fixed = _catalogue(tmp_path, 'outputs = ["9:16"]\nfocus = "top"\nheight = 64\nwidth = 128')
    with pytest.raises(CatalogueError, match=r"template 'tall': `focus` must be center, left or right"):
        Catalogue.from_file(fixed, WAN22_RULES)


@pytest.fixture
def nothing_starts(monkeypatch) -> None:
    """Fail the test if a flow starts or any weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may start or load before the checks pass")

    monkeypatch.setattr(flows.nightly, "nightly", refuse)
    monkeypatch.setattr(flows.generate, "generate", refuse)
    for name in ("load_component", "load_text_encoder", "load_transformer", "load_vae"):
        monkeypatch.setattr(t2v.models.registry, name, refuse)


def _refused(args: list[str]) -> str:
    """The one stderr line of a command that must exit 2 with nothing on stdout."""
    result = CliRunner().invoke(app, args)
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_preview_wider_than_the_final_clip_stops_the_night(tmp_path, data_dir, nothing_starts):
    # 96 fits the written 128-wide frame, not the 64-wide clip the picture gives.
    catalogue = _catalogue(tmp_path, 'preview = { format = "webp", width = 96 }')
    assert _refused(["nightly", "--catalogue", str(catalogue)]) == (
        f"error: {catalogue}:8: template 'tall': "
        "`preview.width` must be 16 to the clip's width (64) but is 96."
    )
    assert not data_dir.exists()


def test_generate_checks_its_outputs_on_the_size_its_picture_gives(
    tmp_path, data_dir, nothing_starts, monkeypatch
):
    Image.new("RGB", (100, 800), "white").save(tmp_path / "pole.png")
    pole = str(tmp_path / "pole.png")
    # 832x480's area from a 1:8 picture is a 192x1280 clip, whose 9:16 crop cuts top and bottom: `top`
    # applies (on 832x480 it would not), `left` does not.
    message = _refused(["generate", "p", "--image", pole, "--outputs", "9:16", "--focus", "left"])
    assert message.startswith(
        "error: `focus` must be center, top or bottom for the 9:16 crop of a 192x1280 clip"
    )
    assert not data_dir.exists()
    started = []
    monkeypatch.setattr(flows.generate, "generate", lambda job, **kw: started.append(job) or kw["out"])
    result = CliRunner().invoke(
        app, ["generate", "p", "--image", pole, "--outputs", "9:16", "--focus", "top"]
    )
    assert result.exit_code == 0, result.output
    assert [(job.width, job.height, job.fit, job.focus) for job in started] == [(192, 1280, "crop", "top")]
