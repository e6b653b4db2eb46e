"""Attention backends (t2v/attention.py): `auto` off a card, the card probe (fastest exact kernel, the
missing and failing ones skipped, once per shape), explicit kernels through diffusers' processors on
the tiny model, the lossy `sage` alone in the store key, refusals before any model loads, and the
choice on the diffusion's run-log row."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers import transformer_wan
from PIL import Image
from typer.testing import CliRunner

import flows.generate
import flows.nightly
from t2v import attention
from t2v.context import RunContext, check_jobs
from t2v.engine import Hooks, StageRunner
from t2v.errors import CatalogueError, InvalidInput
from t2v.jobs import Catalogue, JobSpec
from t2v.models.registry import load_component, resolve_model
from t2v.models.wan22 import WAN22_RULES
from t2v.pipeline import PIPELINE, JobKeys, KeyInputs
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.main import app

JOB = JobSpec(template="fox", prompt="a red fox trots through snow", height=64, width=96, frames=9, steps=2)
SHAPE = attention.Shape(tokens=27280, heads=24, head_dim=128, dtype=torch.bfloat16)
"""1280x704x121: the 720P self-attention."""


@pytest.fixture(autouse=True)
def native_again():
    """diffusers' own `set_attention_backend` (which a test calls directly) also sets its process-wide
    default: give the next test native."""
    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def _no_sage(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "sageattention" else real(name, *a, **k),
    )


# --- choosing -------------------------------------------------------------------------------------


def _probe(times: dict[str, float | Exception], offered=lambda backend: True) -> tuple[attention.Probe, list]:
    """A probe on a pretend card whose kernels take `times` (or raise them); it notes each timing."""
    timed = []

    def timer(backend: str, shape: attention.Shape, device: str) -> float:
        timed.append((backend, shape.tokens))
        outcome = times[backend]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return attention.Probe(offered=offered, timer=timer, card=lambda device: "Pretend H200"), timed


def test_auto_is_sdpa_off_a_card_and_probes_nothing():
    probe, timed = _probe({})
    assert attention.resolve("auto", SHAPE, "cpu", probe=probe) == "sdpa"
    assert timed == []


def test_the_probe_takes_the_fastest_kernel_skipping_missing_and_failing_ones(caplog):
    probe, timed = _probe(
        {"sdpa": 3.0, "cudnn": RuntimeError("No available kernel.\nmore"), "flash": 1.0, "efficient": 2.5},
        offered=lambda backend: backend != "flash",  # flash would be fastest, but this torch lacks it
    )
    with caplog.at_level(logging.INFO, logger="t2v"):
        assert attention.resolve("auto", SHAPE, "cuda:0", probe=probe) == "efficient"
    assert [b for b, _ in timed] == ["sdpa", "cudnn", "efficient"]
    line = caplog.records[-1].getMessage()
    assert "Pretend H200, 27280 tokens x 24 heads x 128 (bfloat16)" in line
    assert "flash not in this torch" in line and "cudnn failed (RuntimeError: No available kernel.)" in line
    assert "efficient 2.50 ms; taking efficient" in line
    # Once per shape: the night's second job of that size asks again and is not timed again.
    assert attention.resolve("auto", SHAPE, "cuda:0", probe=probe) == "efficient" and len(timed) == 3
    assert attention.resolve("auto", replace(SHAPE, tokens=9360), "cuda:0", probe=probe) == "efficient"
    assert len(timed) == 6


def test_the_probe_keeps_sdpa_unless_a_kernel_is_clearly_faster_never_sage_and_falls_back_to_sdpa():
    # Named, a kernel runs inside PyTorch's selection context, which card-side timing does not see:
    # one as fast as sdpa (the same kernel, as cuDNN's on the H200) ran slower by name.
    probe, _ = _probe({"sdpa": 1.0, "cudnn": 1.0, "flash": 1.0, "efficient": 1.0})
    assert attention.resolve("auto", SHAPE, "cuda", probe=probe) == "sdpa"
    close, _ = _probe({"sdpa": 1.0, "cudnn": 0.97, "flash": 2.0, "efficient": 3.0})
    assert attention.resolve("auto", SHAPE, "cuda", probe=close) == "sdpa"
    faster, _ = _probe({"sdpa": 1.0, "cudnn": 0.97, "flash": 0.9, "efficient": 3.0})
    assert attention.resolve("auto", SHAPE, "cuda", probe=faster) == "flash"
    assert "sage" not in attention.Probe().candidates
    broken, _ = _probe({b: RuntimeError("no") for b in ("sdpa", *attention.LOSSLESS)})
    assert attention.resolve("auto", SHAPE, "cuda", probe=broken) == "sdpa"


def test_an_explicit_kernel_is_taken_as_it_is_on_a_card_and_refused_off_one():
    probe, timed = _probe({})
    for name in ("sdpa", "cudnn", "flash", "efficient", "sage"):
        assert attention.resolve(name, SHAPE, "cuda:0", probe=probe) == name
    assert timed == []
    assert attention.resolve("sdpa", SHAPE, "cpu") == "sdpa"
    with pytest.raises(
        InvalidInput, match=r"^`attention` 'cudnn' runs on a CUDA card only, and this run is on cpu"
    ):
        attention.resolve("cudnn", SHAPE, "cpu", probe=probe)


# --- what a template may ask for ------------------------------------------------------------------


def test_a_kernel_set_on_one_transformer_is_not_every_later_ones_default():
    from t2v.models import tiny

    first = tiny.build_transformer()
    assert attention.apply(first, "efficient") and attention.current(first) == "efficient"
    # diffusers' set_attention_backend also sets its process-wide default; apply puts that one back.
    assert attention.current(tiny.build_transformer()) == "sdpa"
    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE


@pytest.mark.parametrize("value", ["fast", "SDPA", "", None, 1])
def test_a_bad_value_is_one_line_naming_the_field(value):
    with pytest.raises(InvalidInput) as caught:
        replace(JOB, attention=value).validate(WAN22_RULES)
    message = str(caught.value)
    assert (
        message == f"`attention` must be one of auto, sdpa, cudnn, flash, efficient, sage but is {value!r}."
    )


def test_a_catalogue_takes_it_per_template_and_from_defaults_and_names_a_bad_one(tmp_path):
    path = tmp_path / "templates.toml"
    path.write_text(
        '[defaults]\nattention = "efficient"\n\n[[template]]\nname = "a"\nprompt = "a fox"\n\n'
        '[[template]]\nname = "b"\nprompt = "an owl"\nattention = "sdpa"\n'
    )
    assert [j.attention for j in Catalogue.from_file(path, WAN22_RULES).jobs] == ["efficient", "sdpa"]
    path.write_text('[[template]]\nname = "ok"\nprompt = "a fox"\nattention = "fastest"\n')
    with pytest.raises(CatalogueError, match=r"templates.toml:2: template 'ok': `attention` must be one of"):
        Catalogue.from_file(path, WAN22_RULES)


def test_sage_without_its_package_is_refused_naming_the_template(tmp_path, monkeypatch):
    _no_sage(monkeypatch)
    path = tmp_path / "templates.toml"
    path.write_text('[[template]]\nname = "ok"\nprompt = "a fox"\nattention = "sage"\n')
    jobs = Catalogue.from_file(path, WAN22_RULES).jobs  # a valid value: the host's packages come later
    with pytest.raises(CatalogueError) as caught:
        check_jobs(jobs, resolve_model("tiny"), catalogue=path)
    message = str(caught.value)
    assert "templates.toml:2: template 'ok': `attention` 'sage' needs the sageattention package" in message
    assert "github.com/thu-ml/SageAttention" in message and "\n" not in message


def test_a_sage_older_than_diffusers_needs_is_refused_with_its_version(monkeypatch):
    monkeypatch.setattr(attention, "_version", lambda package: (1, 0, 6))
    with pytest.raises(InvalidInput, match=r"2\.1\.1 or later, which is 1\.0\.6 here; build it from"):
        attention.check_installed("sage")
    monkeypatch.setattr(attention, "_version", lambda package: (2, 2, 0))
    attention.check_installed("sage")


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--attention", "sage"], "github.com/thu-ml/SageAttention"),
        (["--attention", "cudnn"], "`attention` 'cudnn' runs on a CUDA card only, and this run is on cpu"),
        (["--attention", "fastest"], "`attention` must be one of auto, sdpa"),
    ],
)
def test_the_cli_refuses_in_one_line_before_any_flow(args, names, data_dir, monkeypatch):
    def no_flow(*args, **kwargs):
        raise AssertionError("the flow must not start")

    _no_sage(monkeypatch)
    monkeypatch.setattr(flows.generate, "generate", no_flow)
    monkeypatch.setattr(flows.nightly, "nightly", no_flow)
    result = CliRunner().invoke(app, ["generate", "a cat", "--height", "64", "--width", "96", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.stderr
    assert not data_dir.exists()


def test_only_sage_changes_the_diffuse_key():
    model = resolve_model("tiny")

    def keys(job: JobSpec) -> JobKeys:
        return JobKeys.of(PIPELINE, KeyInputs(job, model))

    assert "attention" not in DIFFUSE.key(KeyInputs(JOB, model))
    for name in ("auto", "sdpa", "cudnn", "flash", "efficient"):
        assert keys(replace(JOB, attention=name)) == keys(JOB)
    sage = keys(replace(JOB, attention="sage"))
    assert sage[DIFFUSE] != keys(JOB)[DIFFUSE] and sage[ENCODE] == keys(JOB)[ENCODE]
    assert DIFFUSE.key(KeyInputs(replace(JOB, attention="sage"), model))["attention"] == "sage"


# --- running ----------------------------------------------------------------------------------------


def _runner(folder: Path, load=load_component) -> StageRunner:
    settings = Settings(data_dir=folder, database_url=f"sqlite:///{folder / 'runs.db'}")
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=folder / "out", settings=settings)
    return StageRunner(ctx, hooks=Hooks(load=load))


def _latents(runner: StageRunner, job: JobSpec) -> torch.Tensor:
    for stage in (ENCODE, DIFFUSE):
        runner.run(stage, job)
    return runner.store.load_tensors(DIFFUSE, runner.keys(job)[DIFFUSE])["latents"]


def _diffuse_plans(runner: StageRunner) -> list[str]:
    return [r["plan"] for r in runner.runlog.run(runner.run_id)["stages"] if r["stage"] == DIFFUSE.name]


def test_explicit_sdpa_makes_the_default_latents_and_the_row_names_the_kernel(tmp_path, data_dir):
    def load_on_math(ref, name):
        # A transformer left on another backend: `sdpa` must put it back, not keep what it has.
        module = load_component(ref, name)
        if name == "transformer":
            module.set_attention_backend("_native_math")
        return module

    default = _runner(tmp_path / "default")
    explicit = _runner(tmp_path / "explicit", load=load_on_math)
    plain = _latents(default, JOB)
    torch.testing.assert_close(_latents(explicit, replace(JOB, attention="sdpa")), plain, rtol=0, atol=0)
    # The choice is on the row; the plan itself (what residency and the drills match) keeps its name.
    assert _diffuse_plans(default) == _diffuse_plans(explicit) == ["diffuse:cpu-cfg2-attn-sdpa"]
    assert default.plans(DIFFUSE, JOB)[0].name == "diffuse:cpu-cfg2"


def test_per_frame_timesteps_and_a_step_cache_still_call_the_kernel_set(tmp_path, data_dir, monkeypatch):
    picture = tmp_path / "card.png"
    Image.effect_noise((96, 64), 64).convert("RGB").save(picture)
    job = replace(JOB, image=str(picture), fit="crop", step_cache=0.05)  # frame timesteps + first-block cache
    backends = []
    real = transformer_wan.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        backends.append(backend)
        return real(*args, backend=backend, **kwargs)

    def load_on_math(ref, name):
        module = load_component(ref, name)
        if name == "transformer":
            module.set_attention_backend("_native_math")
        return module

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", spy)
    runner = _runner(tmp_path / "run", load=load_on_math)
    _latents(runner, replace(job, attention="sdpa"))
    # Every attention call of every block, self and cross, through the processors that were set.
    assert backends and set(backends) == {AttentionBackendName.NATIVE}
    assert _diffuse_plans(runner) == ["diffuse:cpu-cfg2-token-ts-attn-sdpa"]
