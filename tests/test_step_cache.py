"""Step caches (t2v/step_caches.py): MagCache with its authors' Wan2.2 TI2V-5B ratios beside the
first-block cache. The ratios are not the tiny model's, but which steps MagCache skips follows from the
ratios alone, so the tiny model shows the mechanism: the predicted passes skipped, the latents moved a
little, nothing at all when off, another store key, bad values refused before any model loads."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import MagCacheConfig

from bench.step_cache import measure
from t2v import frame_timesteps as per_frame
from t2v import stages, step_caches
from t2v.errors import CatalogueError, InvalidInput
from t2v.jobs import Catalogue, JobSpec
from t2v.models import fullsize, tiny
from t2v.models.registry import resolve_model
from t2v.models.wan22 import WAN22_RULES
from t2v.pipeline import PIPELINE, JobKeys, KeyInputs
from t2v.pipeline import diffuse as diffuse_stage
from t2v.pipeline.diffuse import CHECKPOINTS, step_cache

HEIGHT, WIDTH, FRAMES, STEPS, SEED, GUIDANCE = 64, 96, 9, 50, 7, 5.0
JOB = JobSpec(
    template="fox", prompt="a red fox trots through snow", height=HEIGHT, width=WIDTH, frames=FRAMES
)


# --- what a template may ask for ------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, 0.12, 1, "mag", "mag:0.06", "mag:1", "mag:1e-3"])
def test_a_step_cache_value_passes(value):
    replace(JOB, step_cache=value).validate(WAN22_RULES)


@pytest.mark.parametrize(
    "value",
    [-0.1, 1.5, math.nan, True, None, [0.1], "0.1", "MAG", "mag:", "mag:0", "mag:2", "mag:x", "mag:nan"],
)
def test_a_bad_step_cache_is_one_line_naming_the_field(value):
    with pytest.raises(InvalidInput) as caught:
        replace(JOB, step_cache=value).validate(WAN22_RULES)
    message = str(caught.value)
    assert message.startswith("`step_cache` must be 0 (off), a first-block cache threshold up to 1, or 'mag'")
    assert message.endswith(f"but is {value!r}.") and "\n" not in message


def test_a_catalogue_names_the_template_and_line_of_a_bad_step_cache(tmp_path):
    path = tmp_path / "templates.toml"
    path.write_text('[[template]]\nname = "ok"\nprompt = "a fox"\nstep_cache = "mag:2"\n')
    with pytest.raises(CatalogueError, match=r"templates.toml:2: template 'ok': `step_cache` must be 0"):
        Catalogue.from_file(path, WAN22_RULES)
    path.write_text('[[template]]\nname = "ok"\nprompt = "a fox"\nstep_cache = "mag"\n')
    assert Catalogue.from_file(path, WAN22_RULES).jobs[0].step_cache == "mag"


def test_the_cli_text_becomes_the_fields_value():
    assert step_caches.from_text("0.12") == 0.12
    assert step_caches.from_text("0.0") == 0.0  # the option's default: the field's, so the key stays
    assert step_caches.from_text("mag:0.1") == "mag:0.1"


def test_the_diffuse_key_takes_the_step_cache_and_a_default_job_keeps_its_own():
    model = resolve_model("tiny")

    def latents_key(job: JobSpec) -> str:
        return JobKeys.of(PIPELINE, KeyInputs(job, model))[diffuse_stage.STAGE]

    assert diffuse_stage.key(KeyInputs(JOB, model))["step_cache"] == 0.0  # as before there were two caches
    keys = {latents_key(replace(JOB, step_cache=v)) for v in (0.0, 0.12, "mag", "mag:0.1")}
    assert len(keys) == 4
    assert latents_key(replace(JOB, step_cache=0.0)) == latents_key(JOB)


# --- the published ratios -------------------------------------------------------------------------


def _config(ratios: list[float], steps: int) -> MagCacheConfig:
    cache = step_caches.MagCache()
    return MagCacheConfig(
        threshold=cache.threshold,
        max_skip_steps=cache.max_skip_steps,
        retention_ratio=cache.retention_ratio,
        num_inference_steps=steps,
        mag_ratios=ratios,
    )


def test_the_ratios_are_the_authors_49_steps_of_cond_and_uncond_and_50_steps_for_diffusers():
    for published, first, last in (
        (step_caches.TI2V_5B_T2V, 0.99505, 0.97015),
        (step_caches.TI2V_5B_I2V, 0.99512, 0.96616),
    ):
        assert len(published) == 2 * 49 and (published[0], published[-1]) == (first, last)
    for image in (False, True):
        ratios = step_caches.mag_ratios(image=image)
        assert len(ratios) == 50 and ratios[0] == 1.0 and all(0.9 < r < 1.0 for r in ratios[1:])
    assert step_caches.mag_ratios(image=True) != step_caches.mag_ratios(image=False)
    config = step_caches.config("mag", steps=30, image=True)
    assert len(config.mag_ratios) == 30  # diffusers' nearest-neighbour interpolation, as the authors'


def test_cond_uncond_or_their_mean_skip_the_same_steps_at_every_step_count():
    # diffusers keeps one array for all passes; the authors one per pass: at the default threshold the
    # per-step mean skips exactly the steps each pass's own array would, for 1 to 200 steps.
    for published in (step_caches.TI2V_5B_T2V, step_caches.TI2V_5B_I2V):
        cond, uncond = [1.0, *published[0::2]], [1.0, *published[1::2]]
        mean = step_caches.mag_ratios(image=published is step_caches.TI2V_5B_I2V)
        for steps in range(1, 201):
            skips = {tuple(step_caches.skipped_steps(_config(r, steps))) for r in (cond, uncond, mean)}
            assert len(skips) == 1, steps


def test_50_steps_skip_about_half_after_the_first_ten():
    text = step_caches.skipped_steps(step_caches.config("mag", steps=50, image=False))
    image = step_caches.skipped_steps(step_caches.config("mag", steps=50, image=True))
    assert (len(text), len(image)) == (25, 24)
    assert min(text) == min(image) == 10  # retention: the first 20% always computed
    assert len(step_caches.skipped_steps(step_caches.config("mag:0.02", steps=50, image=False))) < 25


# --- the mechanism on the tiny model --------------------------------------------------------------


@pytest.fixture(scope="module")
def embeds(parts):
    return stages.encode_texts(
        parts["text_encoder"],
        parts["tokenizer"],
        [JOB.prompt, "blurry"],
        device="cpu",
        max_sequence_length=512,
    )


def _denoise(
    transformer, embeds, *, cfg_batch: int = 1, condition: torch.Tensor | None = None
) -> torch.Tensor:
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    return stages.denoise(
        transformer,
        tiny.build_scheduler(),
        stages.initial_noise(shape, seed=SEED, device="cpu"),
        embeds[:1],
        embeds[1:],
        steps=STEPS,
        guidance=GUIDANCE,
        compute_dtype=torch.float32,
        shared_timestep=condition is None,
        cfg_batch=cfg_batch,
        condition=condition,
        frame_timesteps=condition is not None,
    )


def _counting(parts) -> tuple[torch.nn.Module, list[int]]:
    """A fresh transformer whose first block's FFN counts its calls: a step MagCache skips runs no block."""
    transformer, calls = fullsize.clone(parts["transformer"]), []
    transformer.blocks[0].ffn.register_forward_hook(lambda *args: calls.append(1))
    return transformer, calls


@pytest.fixture(scope="module")
def plain(parts, embeds):
    return _denoise(parts["transformer"], embeds)


def test_off_is_bit_equal_to_the_plain_path_also_after_a_cached_job(parts, embeds, plain):
    transformer, _ = _counting(parts)
    with step_cache(transformer, 0.0, steps=STEPS):
        assert torch.equal(_denoise(transformer, embeds), plain)
    with step_cache(transformer, "mag", steps=STEPS):
        _denoise(transformer, embeds)
    assert torch.equal(_denoise(transformer, embeds), plain)  # the job's cache is gone with the job


@pytest.mark.parametrize("cfg_batch", [1, 2])
def test_magcache_skips_the_predicted_passes_and_moves_the_latents_a_little(parts, embeds, plain, cfg_batch):
    transformer, calls = _counting(parts)
    skipped = step_caches.skipped_steps(step_caches.config("mag", steps=STEPS, image=False))
    with step_cache(transformer, "mag", steps=STEPS, image=False):
        cached = _denoise(transformer, embeds, cfg_batch=cfg_batch)
    passes = 2 if cfg_batch == 1 else 1  # cond and uncond, or both in one batch
    assert len(calls) == passes * (STEPS - len(skipped)) == passes * 25
    # Measured on the tiny model, 64x96x9, 50 steps, CFG 5: relative L2 0.0016, max abs 0.0077 of 4.3
    # (the same with CFG batched: one cache context holds both halves).
    change = (cached - plain).norm() / plain.norm()
    assert 5e-4 < change < 5e-3
    assert (cached - plain).abs().max() < 0.02


def test_an_image_job_takes_the_picture_ratios_beside_the_first_frame_hooks(parts, embeds):
    transformer, calls = _counting(parts)
    per_frame.install(transformer)  # as DiffuseOptions.prepare does, before the job's cache
    first_frame = torch.randn(1, 48, 1, HEIGHT // 16, WIDTH // 16, generator=torch.Generator().manual_seed(0))
    plain = _denoise(transformer, embeds, condition=first_frame)
    calls.clear()
    with step_cache(transformer, "mag", steps=STEPS, image=True):
        cached = _denoise(transformer, embeds, condition=first_frame)
    skipped = step_caches.skipped_steps(step_caches.config("mag", steps=STEPS, image=True))
    assert len(calls) == 2 * (STEPS - len(skipped)) == 2 * 26
    assert 1e-4 < (cached - plain).norm() / plain.norm() < 5e-3
    assert torch.equal(cached[:, :, :1], plain[:, :, :1])  # the picture's frame is the picture's


def test_a_cached_diffusion_through_the_runner_saves_no_checkpoint(tmp_path, monkeypatch):
    from test_resume import _latents, _runner

    from t2v.pipeline.encode import STAGE as ENCODE

    job = replace(JOB, steps=STEPS, step_cache="mag")
    asked = []
    real = step_caches.config
    monkeypatch.setattr(step_caches, "config", lambda s, **kw: asked.append((s, kw)) or real(s, **kw))
    runner = _runner(tmp_path / "cached")
    runner.run(ENCODE, job)
    written = []
    runner.store.on_written = lambda stage, temp: written.append(stage.folder)
    runner.run(diffuse_stage.STAGE, job)
    assert asked == [("mag", dict(steps=STEPS, image=False))]
    assert written == [diffuse_stage.STAGE.folder] and CHECKPOINTS.folder not in written

    plain = _runner(tmp_path / "plain")
    plain_job = replace(job, step_cache=0.0)
    plain.run(ENCODE, plain_job)
    plain.run(diffuse_stage.STAGE, plain_job)
    cached, uncached = _latents(runner, job), _latents(plain, plain_job)
    assert 5e-4 < (cached - uncached).norm() / uncached.norm() < 5e-3


def test_the_benchmark_snippet_runs_on_the_tiny_model(parts, embeds):
    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    record = measure(
        fullsize.clone(parts["transformer"]),
        tiny.build_scheduler(),
        stages.initial_noise(shape, seed=SEED, device="cpu"),
        embeds[:1],
        embeds[1:],
        10,
        warmup_steps=1,
    )
    assert record["skipped_steps"] == [2, 3, 5, 6, 8] and record["speedup"] > 0
    assert 0 < record["latents_rel_l2"] < 0.05 and record["latents_max_abs"] > 0


def test_the_calibration_gives_each_pass_its_ratios_for_magcacheconfig(parts, embeds):
    from bench.step_cache import calibrate

    shape = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)
    transformer = fullsize.clone(parts["transformer"])
    noise = stages.initial_noise(shape, seed=SEED, device="cpu")
    ratios = calibrate(transformer, tiny.build_scheduler(), noise, embeds[:1], embeds[1:], 10)
    assert set(ratios) == {"cond", "uncond"}
    for per_step in ratios.values():
        assert len(per_step) == 10 and per_step[0] == 1.0 and all(0.5 < r < 2 for r in per_step)
    assert not getattr(transformer, "is_cache_enabled", False)  # the calibration's hooks are gone
