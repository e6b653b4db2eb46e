"""Image-conditioned templates: the staged path against one `WanImageToVideoPipeline` call on the tiny
model in fp32, the two-value timestep switch, the keys, the size rule, and the pictures t2v refuses."""

from __future__ import annotations

import functools
import io
import logging
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import flows.generate
import flows.nightly
from t2v import frame_timesteps, images, stages
from t2v.context import RunContext
from t2v.engine import Hooks, StageRunner
from t2v.errors import InvalidInput
from t2v.jobs import Catalogue, JobSpec
from t2v.models import fullsize, registry, tiny
from t2v.models.registry import load_component, resolve_model
from t2v.models.wan22 import WAN22_RULES
from t2v.pipeline import CLIP, PIPELINE, JobKeys, KeyInputs, condition, diffuse
from t2v.pipeline import stages as pipeline_stages
from t2v.plans import ComponentSizes
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.main import app

HEIGHT, WIDTH, FRAMES, STEPS, SEED, GUIDANCE = 64, 96, 9, 3, 7, 5.0
PROMPT, NEGATIVE = "the fox looks up as snow starts to fall", "blurry"


def noise_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


# --- the staged path against the pipeline ---------------------------------------------------------


@pytest.fixture(scope="module")
def embeds(parts):
    return stages.encode_texts(
        parts["text_encoder"], parts["tokenizer"], [PROMPT, NEGATIVE], device="cpu", max_sequence_length=512
    )


@pytest.fixture(scope="module")
def picture():
    return images.fit_picture(images.Picture(noise_picture(150, 100)), WIDTH, HEIGHT, "crop")


@pytest.fixture(scope="module")
def reference(parts, embeds, picture):
    """One `WanImageToVideoPipeline.__call__` with expand_timesteps=True: its latents and frames. The
    prompt goes in as embeddings: the I2V pipeline's own prompt cleaning needs ftfy, and they are
    WanPipeline's (tests/test_stages.py holds t2v's encode to that)."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(**parts, scheduler=tiny.build_scheduler(), expand_timesteps=True)
    common = dict(
        image=picture,
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
    )
    latents = pipe(**common, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    frames = pipe(**common, generator=torch.Generator().manual_seed(SEED), output_type="np").frames[0]
    return latents, frames


def staged(parts, embeds, picture, transformer=None, **switches) -> torch.Tensor:
    first_frame = stages.encode_first_frame(parts["vae"], picture, device="cpu")
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    return stages.denoise(
        transformer or parts["transformer"],
        tiny.build_scheduler(),
        stages.initial_noise(shape, seed=SEED, device="cpu"),
        embeds[:1],
        embeds[1:],
        steps=STEPS,
        guidance=GUIDANCE,
        compute_dtype=torch.float32,
        condition=first_frame,
        **switches,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_plain_staged_path_is_bit_identical_to_the_image_to_video_pipeline(parts, embeds, picture, reference):
    latents = staged(parts, embeds, picture, shared_timestep=False, cfg_batch=1)
    torch.testing.assert_close(latents, reference[0], rtol=0, atol=0)
    # The first latent frame is the picture's, written back after the last step.
    first_frame = stages.encode_first_frame(parts["vae"], picture, device="cpu")
    torch.testing.assert_close(latents[:, :, :1], first_frame, rtol=0, atol=0)
    frames = stages.decode_latents(parts["vae"], latents, device="cpu")
    np.testing.assert_array_equal(frames, stages.to_uint8(reference[1]))


@pytest.fixture(scope="module")
def hooked(parts):
    return frame_timesteps.install(fullsize.clone(parts["transformer"]))


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_the_two_value_switch_is_within_fp32_rounding_of_the_per_token_path(
    parts, embeds, picture, reference, hooked, cfg_batch
):
    two = staged(
        parts, embeds, picture, hooked, shared_timestep=False, cfg_batch=cfg_batch, frame_timesteps=True
    )
    assert 0 < rel(two, reference[0]) < 1e-5  # other GEMM shapes round differently, nothing more


def test_the_hooks_are_inert_without_per_frame_timesteps(parts, embeds, picture, reference, hooked):
    # The per-token path through a hooked transformer is the stock path, bit for bit; so is text-only.
    per_token = staged(parts, embeds, picture, hooked, shared_timestep=False, cfg_batch=1)
    torch.testing.assert_close(per_token, reference[0], rtol=0, atol=0)
    noise = stages.initial_noise((1, 48, 3, 4, 6), seed=1, device="cpu")
    text = dict(steps=2, guidance=GUIDANCE, compute_dtype=torch.float32, shared_timestep=True)
    a = stages.denoise(parts["transformer"], tiny.build_scheduler(), noise, embeds[:1], embeds[1:], **text)
    b = stages.denoise(hooked, tiny.build_scheduler(), noise, embeds[:1], embeds[1:], **text)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_an_image_job_never_takes_the_shared_timestep(parts, embeds, picture, hooked):
    with pytest.raises(ValueError, match="text-only"):
        staged(parts, embeds, picture, shared_timestep=True)
    with pytest.raises(ValueError, match="install"):  # the switch without its hooks
        staged(parts, embeds, picture, shared_timestep=False, frame_timesteps=True)
    sizes = registry_sizes()
    image_job = JobSpec(template="card", prompt="p", image="card.png", fit="crop")
    text_job = JobSpec(template="text", prompt="p")
    for device in ("cpu", "cuda"):
        for plan in diffuse.ladder(sizes, image_job, device=device):
            assert not plan.options.shared_timestep and plan.options.frame_timesteps, plan.name
        assert all(plan.options.shared_timestep for plan in diffuse.ladder(sizes, text_job, device=device))


@functools.cache
def registry_sizes() -> ComponentSizes:
    """The full-size transformer's, from its weightless skeleton."""
    skeleton = registry.skeleton(resolve_model(registry.RANDOM_FULL_SIZE), "transformer")
    return ComponentSizes.from_modules(transformer=skeleton)


def test_the_estimate_counts_the_per_token_projection_only_with_the_switch_off():
    sizes = registry_sizes()
    job = JobSpec(
        template="card", prompt="p", image="card.png", fit="crop", height=704, width=1280, frames=121
    )
    tokens = diffuse.diffusion_tokens(job)
    for batch, chunks in ((1, 8), (2, 1)):
        on, off = (
            diffuse.activation_bytes(sizes, job, batch=batch, ffn_chunks=chunks, frame_timesteps=switch)
            for switch in (True, False)
        )
        extra = 1.3 * batch * tokens * 6 * sizes.transformer_dim * diffuse.TOKEN_MODULATION_BYTES
        assert abs(off - on - extra) <= 1  # 5 GB a sample at 720P
        # An attempt needs the larger of the first frame's encode and the denoising, not both.
        attempt = diffuse.attempt_bytes(sizes, job, batch=batch, ffn_chunks=chunks, frame_timesteps=True)
        assert attempt == max(on, condition.encode_bytes(job)) and condition.encode_bytes(job) > 2**31
    on, off = (diffuse.ladder(sizes, job, device="cuda", frame_timesteps=s) for s in (True, False))
    assert all(b.estimate_bytes > a.estimate_bytes for a, b in zip(on, off, strict=True))
    text = replace(job, image=None, fit=None)
    assert condition.encode_bytes(text) == 0
    text_on, text_off = (diffuse.ladder(sizes, text, device="cuda", frame_timesteps=s) for s in (True, False))
    assert [p.estimate_bytes for p in text_on] == [p.estimate_bytes for p in text_off]


# --- keys --------------------------------------------------------------------------------------------


def test_a_text_only_job_has_the_keys_it_had_and_an_image_job_keys_its_picture(tmp_path):
    model = resolve_model("tiny")
    text = JobSpec(template="fox", prompt="a fox", height=64, width=96, frames=9, steps=2)
    # No part for the picture in a text-only job's keys, whatever `fit` says.
    assert JobKeys.of(PIPELINE, KeyInputs(replace(text, fit="pad"), model)) == JobKeys.of(
        PIPELINE, KeyInputs(text, model)
    )
    assert "first_frame" not in diffuse.key(KeyInputs(text, model))
    card = tmp_path / "card.png"
    noise_picture(96, 64).save(card)
    job = replace(text, image=str(card), fit="crop")

    def latents_key(j: JobSpec) -> str:
        return JobKeys.of(PIPELINE, KeyInputs(j, model))[diffuse.STAGE]

    base = latents_key(job)
    assert base != latents_key(text)
    moved = tmp_path / "moved.png"
    moved.write_bytes(card.read_bytes())
    assert latents_key(replace(job, image=str(moved))) == base  # the bytes, not the path
    assert latents_key(replace(job, fit="pad")) != base
    assert latents_key(replace(job, height=96, width=64)) != base
    noise_picture(96, 64, seed=1).save(card)
    assert latents_key(job) != base  # an edited picture is another clip


def test_an_image_job_comes_back_whole_from_the_run_logs_json(tmp_path):
    from t2v.rerun import Night

    job = JobSpec(
        template="card", prompt="p", image=str(tmp_path / "card.png"), fit="pad", height=64, width=96
    )
    night = Night(jobs=(job,), outputs_dir=tmp_path)
    assert Night.from_json(night.to_json()).jobs == (job,)


# --- the size rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("picture", "area", "size"),
    [
        ((1024, 768), (832, 480), (704, 544)),
        ((1920, 1080), (832, 480), (832, 480)),
        ((1920, 1080), (1280, 704), (1248, 704)),
        ((1080, 1920), (1280, 704), (704, 1248)),
        ((800, 800), (832, 480), (640, 608)),  # a tie: height first, as the official rule
        ((6000, 1000), (832, 480), (1280, 256)),  # past the longest side: clamped, then cropped
    ],
)
def test_clip_size_keeps_the_aspect_at_the_area_as_the_official_rule(picture, area, size):
    w, h = images.clip_size(*picture, area=area[0] * area[1])
    assert (w, h) == size
    assert w % 32 == 0 and h % 32 == 0 and w * h <= area[0] * area[1] and max(w, h) <= 1280


def test_the_generate_help_says_what_size_a_picture_gives():
    result = CliRunner().invoke(app, ["generate", "--help"])
    w, h = images.clip_size(1024, 768, area=832 * 480)
    help_text = " ".join(result.stdout.split())  # unwrapped
    assert (
        result.exit_code == 0
        and f"a 1024x768 picture at the 480P area (832x480) gives a {w}x{h} clip" in help_text
    )


def write_catalogue(folder: Path, template: str, defaults: str = "height = 64\nwidth = 96") -> Path:
    path = folder / "templates.toml"
    head = f"[defaults]\nframes = 9\nsteps = 2\n{defaults}\n"
    path.write_text(f'{head}\n[[template]]\nname = "card"\nprompt = "p"\n{template}\n')
    return path


def test_the_catalogue_sizes_its_picture_jobs(tmp_path, caplog):
    (tmp_path / "pics").mkdir()
    noise_picture(200, 150).save(tmp_path / "pics" / "wide.png")

    def job(template: str, **kw) -> JobSpec:
        return Catalogue.from_file(write_catalogue(tmp_path, template, **kw), WAN22_RULES).jobs[0]

    auto = job('image = "pics/wide.png"')  # relative to the catalogue; [defaults] give the area
    assert (auto.image, auto.width, auto.height, auto.fit) == (
        str(tmp_path / "pics" / "wide.png"),
        96,
        64,
        "crop",
    )
    fixed = job('image = "pics/wide.png"\nheight = 96\nwidth = 96\nfit = "pad"')
    assert (fixed.width, fixed.height, fixed.fit) == (96, 96, "pad")
    with caplog.at_level(logging.WARNING, logger="t2v"):
        far = job('image = "pics/wide.png"\nheight = 128\nwidth = 64')  # 4:3 into 1:2, fit unset
    assert (far.width, far.height, far.fit) == (64, 128, "crop")
    assert "cropped" in caplog.text and "wide.png" in caplog.text


def test_pictures_are_made_rgb_first_frame_and_fitted(tmp_path, caplog):
    clear = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (10, 0, 30, 20))
    clear.save(tmp_path / "logo.png")
    logo = images.read_picture(tmp_path / "logo.png")
    assert logo.pixels.mode == "RGB" and logo.pixels.getpixel((0, 0)) == images.MATTE
    assert logo.pixels.getpixel((20, 10)) == (0, 0, 255)
    padded = images.fit_picture(logo, 40, 40, "pad")
    assert padded.size == (40, 40) and padded.getpixel((20, 2)) == images.BARS
    assert images.fit_picture(logo, 20, 20, "crop").getpixel((10, 10)) == (0, 0, 255)  # the centre kept
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    job = JobSpec(template="anim", prompt="p", image=str(tmp_path / "anim.gif"), height=64, width=64)
    with caplog.at_level(logging.WARNING, logger="t2v"):
        sized = images.size_for_picture(job, WAN22_RULES, size_given=True)
    assert "has 2 frames: its first is used" in caplog.text and sized.fit == "crop"
    assert images.read_picture(job.image).pixels.getpixel((0, 0))[0] > 200  # red: the first frame


# --- the night -----------------------------------------------------------------------------------


def test_a_night_encodes_each_first_frame_once_and_loads_the_encoder_once(tmp_path, data_dir):
    noise_picture(200, 150).save(tmp_path / "card.png")
    size = dict(height=64, width=96, frames=9, steps=2)
    cards = [
        JobSpec(template=f"card{i}", prompt="p", seed=i, image=str(tmp_path / "card.png"), fit="crop", **size)
        for i in (1, 2)
    ]
    jobs = [*cards, JobSpec(template="text", prompt="p", **size)]
    loads: list[str] = []

    def load(ref, name):
        loads.append(name)
        return load_component(ref, name)

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
    runner = StageRunner(ctx, hooks=Hooks(load=load))
    for stage in pipeline_stages():
        for job in jobs:
            runner.run(stage, job)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["card1.mp4", "card2.mp4", "text.mp4"]
    # Two image jobs, one picture and size: one first frame stored, one encoder load for the night;
    # the decoder's VAE is the decode stage's own load.
    assert len(list((tmp_path / "store" / condition.CONDITIONS.folder).rglob("*.safetensors"))) == 1
    assert loads.count("vae") == 2 and loads.count("transformer") == 1
    rows = RunLog(settings.runlog_url).run(run_id)["stages"]
    plans = {r["template"]: r["plan"] for r in rows if r["stage"] == diffuse.STAGE.name}
    assert plans == {
        "card1": "diffuse:cpu-cfg2-token-ts-attn-sdpa",
        "card2": "diffuse:cpu-cfg2-token-ts-attn-sdpa",
        "text": "diffuse:cpu-cfg2-attn-sdpa",
    }
    assert CLIP.name in {r["stage"] for r in rows}


# --- bad input -----------------------------------------------------------------------------------


def _png(width: int, height: int, depth: int = 8, colour: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit RGB, nor a header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = (
        rows
        if rows is not None
        else b"".join(b"\x00" + b"\x80" * (width * 3 * depth // 8) for _ in range(height))
    )
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(body))
        + chunk(b"IEND", b"")
    )


def _saved(image: Image.Image, kind: str) -> bytes:
    out = io.BytesIO()
    image.save(out, kind)
    return out.getvalue()


_JPEG = _saved(Image.effect_noise((128, 128), 40).convert("RGB"), "JPEG")
BAD = {
    "missing": (None, "must be an existing file but is '{path}'."),
    "not-an-image": (b"GIF89a, or so it says\n", "'{path}' is not an image Pillow can read (cannot identify"),
    "truncated": (_JPEG[: len(_JPEG) // 2], "'{path}' is truncated or corrupt (image file is truncated"),
    "corrupt": (_png(16, 16, rows=b"\x07" * 10), "'{path}' is truncated or corrupt ("),
    "bomb": (
        _png(20000, 20000, rows=b""),
        "'{path}' is too large to decode safely (Image size (400000000 pixels)",
    ),
    "cmyk": (
        _saved(Image.new("CMYK", (16, 16)), "JPEG"),
        "'{path}' is CMYK, whose colours depend on a print profile",
    ),
    "grey-16": (
        _saved(Image.new("I;16", (16, 16)), "PNG"),
        "'{path}' has 16 or more bits per channel (mode I;16)",
    ),
    "rgb-16": (_png(4, 4, depth=16), "'{path}' has 16 or more bits per channel (mode RGB)"),
}


@pytest.fixture
def no_flows(monkeypatch):
    def no_flow(*args, **kwargs):
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.nightly, "nightly", no_flow)
    monkeypatch.setattr(flows.generate, "generate", no_flow)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_picture_is_one_line_naming_template_and_field_before_any_model_loads(
    case, tmp_path, data_dir, no_flows
):
    content, message = BAD[case]
    path = tmp_path / f"{case}.png"
    if content is not None:
        path.write_bytes(content)
    catalogue = write_catalogue(tmp_path, f'image = "{path.name}"')
    result = CliRunner().invoke(app, ["nightly", "--catalogue", str(catalogue)])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {catalogue}:8: template 'card': `image` "), line
    assert message.format(path=path.resolve()) in line, line
    assert not data_dir.exists()  # nothing written: no store, no run log


def test_generate_refuses_a_bad_picture_the_same_way(tmp_path, data_dir, no_flows):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(BAD["cmyk"][0])
    result = CliRunner().invoke(app, ["generate", "a card", "--image", str(path)])
    assert result.exit_code == 2 and not data_dir.exists()
    assert result.stderr.strip() == (
        f"error: `image` '{path}' is CMYK, whose colours depend on a print profile; save it as RGB (sRGB)."
    )
    with pytest.raises(InvalidInput, match="`fit` must be one of crop, pad but is 'zoom'"):
        JobSpec(template="x", prompt="p", image=str(path), fit="zoom").validate(WAN22_RULES)
    with pytest.raises(InvalidInput, match="`fit` must be one of"):  # a text-only job's too
        JobSpec(template="x", prompt="p", fit="zoom").validate(WAN22_RULES)
