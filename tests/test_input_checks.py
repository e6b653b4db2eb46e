"""What is checked before work, below the CLI: settings, the clip's path, the read-only run log, and
the tiny model running every size the job checks allow (the CLI's one-line errors: test_bad_input.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import typer
from diffusers import WanTransformer3DModel

import t2v_cli.checks
from t2v import stages
from t2v.errors import InvalidInput
from t2v.jobs import JobSpec
from t2v.models import tiny
from t2v.models.registry import load_scheduler, resolve_model
from t2v.models.seeding import seeded
from t2v.models.wan22 import WAN22_RULES
from t2v.runlog import NoSuchRun
from t2v.settings import Settings
from t2v_cli.checks import UnmadeRunLog, check_out_path, check_overwrite, open_runlog

# --- settings: every variable t2v reads --------------------------------------------------------

NUMERIC = ["T2V_VRAM_BUDGET_GB", "T2V_CHECKPOINT_S"]


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", ["", "  ", "lots", "nan", "inf", "-inf", "-1", "1e400"])
def test_a_numeric_setting_refuses_what_is_not_a_usable_number(name: str, value: str) -> None:
    with pytest.raises(InvalidInput, match=f"^`{name}` "):
        Settings.from_env({name: value})


def test_zero_is_refused_except_where_it_is_a_setting() -> None:
    with pytest.raises(InvalidInput, match="`T2V_VRAM_BUDGET_GB` must be positive"):
        Settings.from_env({"T2V_VRAM_BUDGET_GB": "0"})
    assert Settings.from_env({"T2V_CHECKPOINT_S": "0"}).checkpoint_seconds == 0  # after every step


def test_numeric_settings_take_numbers() -> None:
    settings = Settings.from_env({"T2V_VRAM_BUDGET_GB": " 7.5 ", "T2V_CHECKPOINT_S": "30"})
    assert (settings.vram_budget_gib, settings.checkpoint_seconds) == (7.5, 30.0)
    assert Settings.from_env({}).vram_budget_gib is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("T2V_PAUSE_AT", "denoise", "names no stage 'denoise'"),
        ("T2V_PAUSE_AT", "diffuse@0", "`stage@step`"),
        ("T2V_PAUSE_AT", "diffuse@x", "`stage@step`"),
        ("T2V_INJECT_OOM", "diffuse", "`stage:plan`"),
        ("T2V_INJECT_OOM", "fox/:gpu", "`stage:plan`"),
        ("T2V_INJECT_OOM", "decode:*, difuse:*", "names no stage 'difuse'"),
        ("T2V_HOOKS", "bench.night", "`module:function`"),
        ("T2V_COMPILE", "always", "auto, on or off"),
        ("T2V_LORA_FUSE", "yes", "on or off"),
    ],
)
def test_a_setting_with_allowed_values_refuses_others(name: str, value: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=f"^`{name}` ") as caught:
        Settings.from_env({name: value})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("T2V_PAUSE_AT", "diffuse"),
        ("T2V_PAUSE_AT", "watermark"),  # the finish stage's old name
        ("T2V_PAUSE_AT", "diffuse@3"),
        ("T2V_INJECT_OOM", "diffuse:cpu-cfg2,fox/diffuse:*, decode:*,"),
        ("T2V_INJECT_OOM", "*:gpu"),
        ("T2V_HOOKS", "bench.night:gpu_machine_hooks"),
        ("T2V_LORA_FUSE", " OFF "),
    ],
)
def test_allowed_values_pass(name: str, value: str) -> None:
    Settings.from_env({name: value})


def test_lora_folding_is_on_unless_switched_off() -> None:
    assert Settings.from_env({}).lora_fuse is True
    assert Settings.from_env({"T2V_LORA_FUSE": " OFF "}).lora_fuse is False
    assert Settings.from_env({"T2V_LORA_FUSE": "on"}).lora_fuse is True


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(InvalidInput, match="^`T2V_DATA_DIR` must be a folder"):
        Settings.from_env({"T2V_DATA_DIR": str(tmp_path / "data")})


# --- the clip's path -----------------------------------------------------------------------------


def test_an_out_path_in_folders_still_to_make_passes_and_makes_nothing(tmp_path: Path) -> None:
    assert check_out_path(str(tmp_path / "a" / "b" / "fox.MP4")) == tmp_path / "a" / "b" / "fox.MP4"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("fox.gif", "must be a file name ending in .mp4"),
        (".mp4", "must be a file name ending in .mp4"),
        ("clips.mp4", "must be a file, not a folder"),
        ("blocker/x/fox.mp4", "cannot be made: '{tmp}/blocker' is a file"),
        ("locked/fox.mp4", "the folder '{tmp}/locked' is not writable"),
    ],
)
def test_bad_out_paths(out: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "clips.mp4").mkdir()
    (tmp_path / "blocker").write_text("")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    access = os.access  # root may write anywhere: answer for the folder as for any other user
    monkeypatch.setattr(t2v_cli.checks.os, "access", lambda p, mode: access(p, mode) and Path(p) != locked)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(typer.BadParameter) as caught:
        check_out_path(out)
    assert message.format(tmp=tmp_path) in str(caught.value)


def test_only_the_same_clip_or_force_may_be_replaced(tmp_path: Path) -> None:
    stored, clip = tmp_path / "stored.mp4", tmp_path / "clip.mp4"
    stored.write_bytes(b"the clip")
    check_overwrite(clip, stored, force=False)  # nothing there yet
    clip.write_bytes(b"the clip")
    check_overwrite(clip, stored, force=False)  # the same clip made again
    clip.write_bytes(b"another clip")
    with pytest.raises(InvalidInput, match="already exists and is not known to be this clip; pass --force"):
        check_overwrite(clip, stored, force=False)
    with pytest.raises(InvalidInput, match="not known to be this clip"):
        check_overwrite(clip, tmp_path / "not-stored.mp4", force=False)  # nothing to compare with
    check_overwrite(clip, stored, force=True)


# --- the run log, for the commands that only read it ------------------------------------------


def test_reading_a_run_log_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    log = open_runlog(settings)

    assert isinstance(log, UnmadeRunLog) and not (tmp_path / "data").exists()
    assert (log.mark_interrupted(), log.runs(limit=5), log.last_run_id()) == (0, [], None)
    with pytest.raises(NoSuchRun):
        log.run("nope")
    assert not (tmp_path / "data").exists()
    # Once a writing command has made it (a dashboard started before the first night), it is read.
    run_id = open_runlog(settings, create=True).start_run(kind="nightly", model="tiny")
    assert [r["id"] for r in log.runs(limit=5)] == [run_id] and log.run(run_id)["id"] == run_id


# --- the tiny model: every size the checks allow, and the same clips as before ----------------------


def _old_transformer() -> WanTransformer3DModel:
    """The tiny transformer as it was built before its RoPE table grew (32 positions)."""
    with seeded(tiny.SEED + 1):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=48,
            out_channels=48,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        ).eval()


def test_the_tiny_transformer_keeps_its_weights_and_first_rope_positions() -> None:
    old, new = _old_transformer(), tiny.build_transformer()

    assert new.config.rope_max_seq_len >= WAN22_RULES.max_side // WAN22_RULES.spatial_multiple
    old_weights, new_weights = old.state_dict(), new.state_dict()
    assert old_weights.keys() == new_weights.keys()
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)
    for table in ("freqs_cos", "freqs_sin"):
        assert torch.equal(getattr(new.rope, table)[:32], getattr(old.rope, table))


def test_a_small_jobs_latents_are_what_they_were() -> None:
    job = JobSpec(template="fox", prompt="a red fox", height=64, width=96, frames=5, steps=2, seed=7)
    tokenizer, encoder = tiny.build_tokenizer(), tiny.build_text_encoder()
    cond, uncond = (
        stages.encode_texts(encoder, tokenizer, [text], device="cpu", max_sequence_length=512)
        for text in (job.prompt, job.negative_prompt)
    )
    noise = stages.job_noise(job, 48, temporal=4, spatial=16, device="cpu")
    latents = stages.denoise(
        tiny.build_transformer(),
        load_scheduler(resolve_model("tiny")),
        noise,
        cond,
        uncond,
        steps=job.steps,
        guidance=job.guidance,
        compute_dtype=torch.float32,
    ).double()

    # Computed with the 32-position table, before it grew.
    assert latents.sum().item() == pytest.approx(31.87146201170981, rel=1e-6)
    assert latents.abs().sum().item() == pytest.approx(2194.7712083291262, rel=1e-6)
    expected = [-0.35245952010154724, 1.1091091632843018, 1.2745616436004639, -0.7653204798698425]
    assert latents.flatten()[:4].tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("height", "width"), [(32, 1280), (1280, 32)])
def test_the_tiny_transformer_runs_the_largest_sides(height: int, width: int) -> None:
    side = WAN22_RULES.max_side
    assert max(height, width) == side
    job = JobSpec(template="wide", prompt="p", height=height, width=width, frames=1, steps=1)
    job.validate(WAN22_RULES)
    latents = stages.job_noise(job, 48, temporal=4, spatial=16, device="cpu")
    text = torch.zeros(1, 8, 32)

    with torch.no_grad():
        out = tiny.build_transformer()(
            hidden_states=latents,
            timestep=torch.tensor([999.0]),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]

    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_a_night_whose_components_the_host_cannot_hold_is_refused_before_any_load(tmp_path, monkeypatch):
    from t2v.context import check_budgets
    from t2v.errors import NoPlanFits
    from t2v.jobs import JobSpec
    from t2v.models.registry import resolve_model
    from t2v.settings import Settings

    job = JobSpec(template="fox", prompt="a fox", height=64, width=96, frames=9, steps=2)
    check_budgets([job], resolve_model("tiny"), Settings(data_dir=tmp_path))  # the host has room
    with pytest.raises(
        NoPlanFits, match=r"text_encoder of the encode stage is .* MiB as loaded.*T2V_RAM_BUDGET_GB"
    ):
        check_budgets([job], resolve_model("tiny"), Settings(data_dir=tmp_path, ram_budget_gib=0.0001))


def test_a_card_no_plan_fits_is_refused_with_what_the_leanest_plan_needs(tmp_path, monkeypatch):
    import t2v.vram
    from t2v.context import check_budgets
    from t2v.errors import NoPlanFits
    from t2v.jobs import JobSpec
    from t2v.models.registry import resolve_model
    from t2v.settings import Settings
    from t2v.vram import DeviceMemory

    card = DeviceMemory("cuda:0", "a small card", 2**30, 2**20, source="budget", cap_bytes=2**20)
    monkeypatch.setattr(t2v.vram, "probe", lambda budget_gib=None: card)
    job = JobSpec(template="fox", prompt="a fox", height=704, width=1280, frames=121, steps=2)
    with pytest.raises(
        NoPlanFits, match=r"`fox` \(1280x704x121\): no .* plan fits the card's 1.0 MiB.*leanest"
    ):
        check_budgets([job], resolve_model("tiny"), Settings(data_dir=tmp_path))


def test_a_host_too_small_for_the_leanest_host_plan_is_refused_with_what_it_needs(tmp_path, monkeypatch):
    import t2v.vram
    from t2v.context import check_budgets
    from t2v.errors import NoPlanFits
    from t2v.jobs import JobSpec
    from t2v.models.registry import resolve_model
    from t2v.settings import Settings
    from t2v.vram import DeviceMemory

    card = DeviceMemory("cuda:0", "a card", 8 * 2**30, 8 * 2**30, source="budget", cap_bytes=8 * 2**30)
    monkeypatch.setattr(t2v.vram, "probe", lambda budget_gib=None: card)
    job = JobSpec(template="fox", prompt="a fox", height=64, width=96, frames=9, steps=2)
    # With a card, a component larger than the host streams from its files: 2 GiB is room enough.
    check_budgets([job], resolve_model("tiny"), Settings(data_dir=tmp_path, ram_budget_gib=2))
    with pytest.raises(
        NoPlanFits, match=r"no encode plan fits the host's 1.0 GiB .* the leanest, encode:.*mapped"
    ):
        check_budgets([job], resolve_model("tiny"), Settings(data_dir=tmp_path, ram_budget_gib=1))
