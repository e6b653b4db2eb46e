"""JobSpec.validate and Catalogue.from_file: every rule rejects bad input with a message naming the field."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from t2v.errors import CatalogueError, InvalidInput
from t2v.jobs import MAX_SEED, Catalogue, JobSpec
from t2v.media import Watermark
from t2v.models import tiny
from t2v.models.wan22 import DEFAULT_NEGATIVE_PROMPT, WAN22_RULES

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "templates.toml"
# Height x width x frames summed over the shipped catalogue. The built-in model's VAE decode dominates its CPU
# time at roughly 0.6-1 s per million; this cap keeps the nightly tiny run well under a minute on 2 cores.
SHIPPED_PIXEL_FRAMES_CAP = 30_000_000


def _job(**changes: object) -> JobSpec:
    good = JobSpec(
        template="ok", prompt="A red kite over a beach.", height=256, width=448, frames=17, steps=4
    )
    return replace(good, **changes)


# --- JobSpec.validate: one row per rule ----------------------------------------------------------

BAD_JOBS = [
    # (field named in the message, changes)
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": "  \n\t "}),
    ("prompt", {"prompt": 42}),
    ("negative_prompt", {"negative_prompt": None}),
    ("height", {"height": 0}),
    ("height", {"height": -32}),
    ("height", {"height": 100}),
    ("height", {"height": 1312}),
    ("height", {"height": 256.0}),
    ("width", {"width": 0}),
    ("width", {"width": -448}),
    ("width", {"width": 450}),
    ("width", {"width": 1312}),
    ("width", {"width": True}),
    ("frames", {"frames": 80}),
    ("frames", {"frames": 125}),
    ("frames", {"frames": 0}),
    ("frames", {"frames": -3}),
    ("frames", {"frames": False}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 201}),
    ("steps", {"steps": 4.5}),
    ("guidance", {"guidance": -1.0}),
    ("guidance", {"guidance": math.nan}),
    ("guidance", {"guidance": math.inf}),
    ("guidance", {"guidance": -math.inf}),
    ("guidance", {"guidance": "5.0"}),
    ("guidance", {"guidance": True}),
    ("fps", {"fps": 0}),
    ("fps", {"fps": 61}),
    ("fps", {"fps": "24"}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": True}),
    ("seed", {"seed": 1.5}),
    ("template", {"template": "../escape"}),
    ("template", {"template": "/etc/x"}),
    ("template", {"template": "Birthday"}),
    ("template", {"template": "birthday.mp4"}),
    ("template", {"template": ""}),
    ("template", {"template": "-leading-dash"}),
    ("template", {"template": "a" * 65}),
    ("template", {"template": "two words"}),
    ("template", {"template": "trailing-newline\n"}),
    ("template", {"template": 7}),
    ("watermark.corner", {"watermark": Watermark(corner="middle")}),
    ("watermark.text", {"watermark": Watermark(text="  ")}),
    ("watermark.opacity", {"watermark": Watermark(opacity=1.5)}),
]


@pytest.mark.parametrize(
    ("field", "changes"), BAD_JOBS, ids=[f"{f}={next(iter(c.values()))!r}"[:40] for f, c in BAD_JOBS]
)
def test_validate_rejects_bad_field(field: str, changes: dict) -> None:
    with pytest.raises(InvalidInput) as info:
        _job(**changes).validate(WAN22_RULES)
    assert type(info.value) is InvalidInput
    assert f"`{field}`" in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"height": 1280, "width": 704, "frames": 121, "steps": 200},
        {"height": 32, "width": 1280, "frames": 1, "steps": 1},
        {"guidance": 0.0, "fps": 60, "seed": MAX_SEED},
        {"guidance": 1, "fps": 1, "seed": 0, "template": "a", "negative_prompt": ""},
        {"template": "x" * 64},
        {"template": "0_night-run"},
    ],
    ids=str,
)
def test_validate_accepts_edges(changes: dict) -> None:
    _job(**changes).validate(WAN22_RULES)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("prompt", {"prompt": "a" * 600}),  # 600 byte tokens + </s>
        ("prompt", {"prompt": "a" * 512}),  # 513 with </s>: one over
        ("negative_prompt", {"negative_prompt": "é" * 300}),  # two bytes each: 601 tokens
    ],
    ids=["600-ascii", "512-ascii", "negative-300-accented"],
)
def test_prompt_over_token_limit(tokenizer, field: str, changes: dict) -> None:
    with pytest.raises(InvalidInput) as info:
        _job(**changes).check_prompt_length(tokenizer, WAN22_RULES)
    assert f"`{field}`" in str(info.value)
    assert "limit is 512" in str(info.value)


def test_prompt_at_token_limit_is_fine(tokenizer) -> None:
    _job(prompt="a" * 511).check_prompt_length(tokenizer, WAN22_RULES)  # 511 + </s> = 512


# --- Catalogue.from_file: one row per rule -------------------------------------------------------

GOOD_TEMPLATE = '[[template]]\nname = "ok"\nprompt = "A red kite."\nheight = 256\nwidth = 448\nframes = 17\n'

BAD_CATALOGUES = [
    # (id, TOML text or bytes, fragments the message must hold; "{path}" is the catalogue file)
    ("not-utf8", b'\xff\xfe[[template]]\nname = "ok"\n', ["{path}: not UTF-8", "byte 0"]),
    ("latin1-prompt", b'[[template]]\nname = "ok"\nprompt = "caf\xe9"\n', ["{path}: not UTF-8", "byte 38"]),
    ("toml-syntax", '[[template]]\nname = "ok"\nprompt = \n', ["{path}: TOML syntax error", "line 3"]),
    ("unclosed-table", '[[template]\nname = "ok"\n', ["{path}: TOML syntax error", "line 1"]),
    ("unknown-top-level", 'title = "night"\n' + GOOD_TEMPLATE, ["{path}: unknown top-level", "'title'"]),
    (
        "unknown-template-key",
        GOOD_TEMPLATE + "sead = 3\n",
        ["{path}:2: template 'ok'", "unknown key(s) ['sead']"],
    ),
    ("unknown-defaults-key", "[defaults]\nsead = 3\n" + GOOD_TEMPLATE, ["{path}: [defaults]", "['sead']"]),
    (
        "prompt-in-defaults",
        '[defaults]\nprompt = "x"\n' + GOOD_TEMPLATE,
        ["{path}: [defaults]", "['prompt']"],
    ),
    (
        "unknown-watermark-key",
        GOOD_TEMPLATE + 'watermark = { colour = "red" }\n',
        ["{path}:2: template 'ok': watermark", "['colour']"],
    ),
    (
        "unknown-defaults-watermark-key",
        '[defaults]\nwatermark = { font = "x" }\n' + GOOD_TEMPLATE,
        ["{path}: [defaults] watermark", "['font']"],
    ),
    (
        "watermark-not-a-table",
        '[defaults]\nwatermark = "t2v"\n' + GOOD_TEMPLATE,
        ["{path}: [defaults] watermark", "must be a table"],
    ),
    (
        "watermark-opacity-text",
        GOOD_TEMPLATE + 'watermark = { opacity = "high" }\n',
        ["{path}:2:", "`watermark.opacity` must be a number"],
    ),
    (
        "watermark-text-number",
        GOOD_TEMPLATE + "watermark = { text = 5 }\n",
        ["{path}:2:", "`watermark.text` must be text"],
    ),
    (
        "watermark-bad-corner",
        GOOD_TEMPLATE + 'watermark = { corner = "centre" }\n',
        ["{path}:2: template 'ok'", "`watermark.corner`", "'centre'"],
    ),
    (
        "watermark-image-missing",
        GOOD_TEMPLATE + 'watermark = { image = "no-such-logo.png" }\n',
        ["{path}:2:", "`watermark.image` must be an existing file", "no-such-logo.png"],
    ),
    (
        "watermark-image-not-an-image",
        GOOD_TEMPLATE + 'watermark = { image = "fake-logo.png" }\n',
        ["{path}:2:", "`watermark.image`", "fake-logo.png", "is not an image"],
    ),
    (
        "duplicate-name",
        GOOD_TEMPLATE + "\n" + GOOD_TEMPLATE,
        ["{path}:9: template 'ok'", "duplicate template name 'ok'"],
    ),
    (
        "missing-name",
        GOOD_TEMPLATE + '\n[[template]]\nprompt = "No name."\n',
        ["{path}: template #2", "`name` is required"],
    ),
    ("name-not-text", '[[template]]\nname = 5\nprompt = "p"\n', ["{path}: template #1", "`name`"]),
    (
        "missing-prompt",
        '[defaults]\nsteps = 4\n\n[[template]]\nname = "quiet"\nheight = 256\n',
        ["{path}:5: template 'quiet'", "`prompt` is required"],
    ),
    ("no-templates", "[defaults]\nfps = 24\n", ["{path}: needs at least one [[template]]"]),
    ("empty-file", "", ["{path}: needs at least one [[template]]"]),
    ("template-single-table", '[template]\nname = "ok"\nprompt = "p"\n', ["{path}: needs at least one"]),
    ("template-not-a-table", 'template = ["ok"]\n', ["{path}: template #1 must be a table"]),
    ("defaults-not-a-table", "defaults = 3\n" + GOOD_TEMPLATE, ["{path}: [defaults]", "must be a table"]),
    ("name-dot-dot", GOOD_TEMPLATE.replace('"ok"', '"../ok"'), ["{path}:2: template '../ok'", "`template`"]),
    ("name-upper", GOOD_TEMPLATE.replace('"ok"', '"OK"'), ["{path}:2: template 'OK'", "`template`"]),
    ("name-newline", GOOD_TEMPLATE.replace('"ok"', '"ok\\n"'), ["{path}", "`template`"]),
    ("frames-rule", GOOD_TEMPLATE.replace("frames = 17", "frames = 80"), ["{path}:2:", "`frames`"]),
    ("height-float", GOOD_TEMPLATE.replace("height = 256", "height = 256.0"), ["{path}:2:", "`height`"]),
    ("guidance-nan", GOOD_TEMPLATE + "guidance = nan\n", ["{path}:2:", "`guidance`"]),
    ("guidance-in-defaults", '[defaults]\nguidance = "high"\n' + GOOD_TEMPLATE, ["{path}:4:", "`guidance`"]),
    ("steps-too-many", GOOD_TEMPLATE + f"seed = {2**63 - 1}\n" + "steps = 201\n", ["{path}:2:", "`steps`"]),
    ("seed-2-to-63", GOOD_TEMPLATE + f"seed = {2**63}\n", ["{path}:2:", "`seed`"]),
]


@pytest.mark.parametrize(
    ("text", "fragments"), [r[1:] for r in BAD_CATALOGUES], ids=[r[0] for r in BAD_CATALOGUES]
)
def test_catalogue_rejects(tmp_path: Path, text: str | bytes, fragments: list[str]) -> None:
    path = tmp_path / "templates.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    (tmp_path / "fake-logo.png").write_text("not a png\n")
    with pytest.raises(CatalogueError) as info:
        Catalogue.from_file(path, WAN22_RULES)
    assert isinstance(info.value, InvalidInput)
    for fragment in fragments:
        assert fragment.format(path=path) in str(info.value)


@pytest.mark.parametrize("where", ["missing.toml", "."], ids=["missing-file", "a-folder"])
def test_catalogue_not_found(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    with pytest.raises(CatalogueError) as info:
        Catalogue.from_file(path, WAN22_RULES)
    assert f"{path}: catalogue not found" in str(info.value)
    assert "`--catalogue PATH`" in str(info.value)


def test_good_catalogue_merges_defaults_and_resolves_watermark_image(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "night"
    (folder / "brand").mkdir(parents=True)
    Image.new("RGBA", (40, 20), (255, 0, 255, 255)).save(folder / "brand" / "logo.png")
    path = folder / "templates.toml"
    path.write_text(
        "[defaults]\n"
        "fps = 30\n"
        "steps = 4\n"
        "guidance = 3.5\n"
        'watermark = { image = "brand/logo.png", corner = "top-left", opacity = 0.5 }\n'
        "\n"
        "[[template]]\n"
        'name = "plain"\n'
        'prompt = "Waves on a pebble beach."\n'
        "height = 256\n"
        "width = 448\n"
        "frames = 17\n"
        "\n"
        "[[template]]\n"
        'name = "custom"\n'
        'prompt = "A paper boat."\n'
        'negative_prompt = "rain"\n'
        "seed = 9\n"
        "height = 448\n"
        "width = 256\n"
        "frames = 25\n"
        "steps = 6\n"
        "guidance = 1\n"
        'watermark = { corner = "bottom-left" }\n',
        encoding="utf-8",
    )
    # Resolution must not depend on the working directory.
    monkeypatch.chdir(tmp_path)
    catalogue = Catalogue.from_file("night/templates.toml", WAN22_RULES)
    logo = (folder / "brand" / "logo.png").resolve()
    assert catalogue.jobs == (
        JobSpec(
            template="plain",
            prompt="Waves on a pebble beach.",
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            seed=0,
            height=256,
            width=448,
            frames=17,
            steps=4,
            guidance=3.5,
            fps=30,
            watermark=Watermark(image=logo, corner="top-left", opacity=0.5),
        ),
        JobSpec(
            template="custom",
            prompt="A paper boat.",
            negative_prompt="rain",
            seed=9,
            height=448,
            width=256,
            frames=25,
            steps=6,
            guidance=1,
            fps=30,
            # Watermark tables merge key by key: the template's corner over the defaults' image.
            watermark=Watermark(image=logo, corner="bottom-left", opacity=0.5),
        ),
    )
    assert catalogue.jobs[0].watermark.image.is_absolute()
    assert not catalogue.jobs[1].cfg


def test_shipped_catalogue_loads(tokenizer) -> None:
    catalogue = Catalogue.from_file(SHIPPED, WAN22_RULES)
    assert len(catalogue.jobs) >= 5
    assert len({job.template for job in catalogue.jobs}) == len(catalogue.jobs)
    for job in catalogue.jobs:
        job.check_prompt_length(tokenizer, WAN22_RULES)
        assert job.negative_prompt == DEFAULT_NEGATIVE_PROMPT
        assert job.fps == 24
        assert job.watermark.text == "t2v"
    assert sum(job.height * job.width * job.frames for job in catalogue.jobs) <= SHIPPED_PIXEL_FRAMES_CAP
