"""Samplers (t2v/samplers.py): dmd and euler against their definitions with a transformer whose velocity
is known in closed form, the staged path against a one-call reference, seeds, resume, keys, a preset
folder saved from the tiny model, and the inputs that are refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from test_resume import Stop, _latents, _runner
from typer.testing import CliRunner

import flows.generate
from t2v import images, samplers, stages
from t2v.context import RunContext
from t2v.engine import Hooks, StageRunner
from t2v.errors import InvalidInput, ModelNotFound
from t2v.jobs import Catalogue, JobSpec
from t2v.models import tiny
from t2v.models.registry import resolve_model
from t2v.models.wan22 import WAN22_RULES
from t2v.pipeline import KeyInputs, diffuse
from t2v.pipeline.diffuse import CHECKPOINTS
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.main import app

HEIGHT, WIDTH, FRAMES, SEED = 64, 96, 9, 7
PROMPT = "a red fox trots through snow"
FASTWAN = (1000, 757, 522)
SHAPE = stages.latent_shape(48, temporal=4, spatial=16, height=HEIGHT, width=WIDTH, frames=FRAMES)


def dmd_job(**changes) -> JobSpec:
    fields = dict(template="fox", prompt=PROMPT, height=HEIGHT, width=WIDTH, frames=FRAMES, seed=SEED)
    return JobSpec(**{**fields, "sampler": "dmd", "timesteps": FASTWAN, "guidance": 1.0, **changes})


def restated_noise(seed: int, step: int) -> torch.Tensor:
    """dmd's fresh noise before `step`, as the definition states it: a seed from SHA-256 of the job's
    seed and the step, drawn on the CPU."""
    digest = hashlib.sha256(f"t2v/dmd-noise/{seed}/{step}".encode()).digest()
    generator = torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return torch.randn(SHAPE, generator=generator)


def table_sigma(t: float) -> float:
    """sigma_t as FastVideo reads it: diffusers' shift-8 flow-matching table, the entry nearest t."""
    table = FlowMatchEulerDiscreteScheduler(shift=samplers.DMD_SIGMA_SHIFT)
    return float(table.sigmas[(table.timesteps.double() - t).abs().argmin()])


# --- the definitions, with a velocity known in closed form ------------------------------------------


class PointMass(torch.nn.Module):
    """The exact flow velocity when every clip is `clean`: x_t = (1 - s) clean + s noise gives
    v = noise - clean = (x_t - clean) / s. `sigma` maps the timestep it is given to s."""

    def __init__(self, clean: torch.Tensor, sigma) -> None:
        super().__init__()
        self.clean, self.sigma = clean, sigma
        self.config = SimpleNamespace(patch_size=(1, 2, 2))
        self.inputs: list[tuple[float, torch.Tensor]] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        t = float(timestep.reshape(-1)[0])
        self.inputs.append((t, hidden_states.clone()))
        return ((hidden_states - self.clean) / self.sigma(t),)


def run(transformer, scheduler, steps: int, **kw) -> torch.Tensor:
    noise = stages.initial_noise(SHAPE, seed=SEED, device="cpu")
    cond = torch.zeros(1, 4, 32)
    return stages.denoise(
        transformer,
        scheduler,
        noise,
        cond,
        None,
        steps=steps,
        guidance=1.0,
        compute_dtype=torch.float32,
        **kw,
    )


def test_dmd_reaches_the_clean_latents_and_renoises_them_with_fresh_noise():
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    transformer = PointMass(clean, table_sigma)
    latents = run(transformer, samplers.DMDSampler(FASTWAN, seed=SEED), steps=3)
    # Each step's x0 = x - sigma v is `clean` exactly; the last one is the result.
    torch.testing.assert_close(latents, clean, rtol=0, atol=1e-5)
    # The raw timesteps reach the transformer; between steps, x0 re-noised to the next timestep with
    # the noise of that step.
    assert [t for t, _ in transformer.inputs] == [1000.0, 757.0, 522.0]
    for step, (t, seen) in enumerate(transformer.inputs[1:], start=1):
        expected = (1 - table_sigma(t)) * clean + table_sigma(t) * restated_noise(SEED, step)
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-5)
    # FastVideo's table puts sigma within 0.0004 of t / 1000.
    sigmas = samplers.dmd_sigmas(torch.tensor(FASTWAN, dtype=torch.float32))
    assert sigmas.tolist() == [table_sigma(t) for t in FASTWAN]
    assert (sigmas - torch.tensor(FASTWAN) / 1000).abs().max() < 4e-4


def test_euler_reaches_the_clean_latents_at_its_timesteps():
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    transformer = PointMass(clean, lambda t: t / 1000)
    latents = run(transformer, samplers.EulerSampler((1000, 750, 500, 250)), steps=4)
    # x <- x + (s_next - s) (x - clean) / s scales x - clean by s_next / s: 0 after the last step.
    torch.testing.assert_close(latents, clean, rtol=0, atol=1e-5)
    assert [t for t, _ in transformer.inputs] == [1000.0, 750.0, 500.0, 250.0]
    with pytest.raises(ValueError, match="4 timesteps given, but 3 steps"):
        run(transformer, samplers.EulerSampler((1000, 750, 500, 250)), steps=3)


# --- the staged path ---------------------------------------------------------------------------------


@torch.no_grad()
def reference(parts, *, seed: int, timesteps, condition: torch.Tensor | None = None) -> torch.Tensor:
    """One call of the DMD loop as FastVideo's `DmdDenoisingStage` writes it (with the first frame of
    Wan2.2-TI2V-5B-Turbo's `Wan22FewstepInferencePipeline`), on diffusers' pieces: WanPipeline's
    prompt encoding and starting noise, the raw timesteps to the transformer, sigma from diffusers'
    shift-8 table, and the definition's fresh noise."""
    pipe = WanPipeline(**parts, scheduler=None, expand_timesteps=True)
    embeds, _ = pipe.encode_prompt(
        prompt=PROMPT, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu"
    )
    x = pipe.prepare_latents(
        1, 48, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", torch.Generator("cpu").manual_seed(seed)
    )
    mask = None if condition is None else stages.first_frame_mask(x)
    for i, t in enumerate(timesteps):
        if mask is None:
            timestep = torch.tensor([float(t)])
        else:  # the picture's frame at timestep 0, as the pipelines' per-token timesteps have it
            x = (1 - mask) * condition + mask * x
            timestep = (mask[0, 0, :, ::2, ::2] * float(t)).flatten().unsqueeze(0)
        v = parts["transformer"](
            hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False
        )[0]
        x0 = x - table_sigma(t) * v
        if i + 1 == len(timesteps):
            return x0 if mask is None else (1 - mask) * condition + mask * x0
        sigma = table_sigma(timesteps[i + 1])
        x = (1 - sigma) * x0 + sigma * restated_noise(seed, i + 1)
    raise AssertionError("no timesteps")


def night(root: Path, *jobs: JobSpec) -> dict[str, torch.Tensor]:
    runner = _runner(root)
    for stage in (ENCODE, DIFFUSE):
        for job in jobs:
            runner.run(stage, job)
    return {job.template: _latents(runner, job) for job in jobs}


def test_the_staged_path_equals_the_one_call_reference_and_a_seed_gives_one_clip(parts, tmp_path):
    a, b = dmd_job(template="a"), dmd_job(template="b", seed=SEED + 1)
    staged = night(tmp_path / "one", a, b)
    torch.testing.assert_close(staged["a"], reference(parts, seed=SEED, timesteps=FASTWAN), rtol=0, atol=0)
    again = night(tmp_path / "two", a)  # another run, another store: the same clip
    assert torch.equal(again["a"], staged["a"])
    assert (staged["a"] - staged["b"]).abs().max() > 0.1  # another seed, another clip
    turbo = night(tmp_path / "turbo", dmd_job(template="t", timesteps=samplers.TURBO_TIMESTEPS))["t"]
    reference_turbo = reference(parts, seed=SEED, timesteps=samplers.TURBO_TIMESTEPS)
    torch.testing.assert_close(turbo, reference_turbo, rtol=0, atol=0)


def test_an_image_job_keeps_its_pictures_first_frame_with_dmd(parts, tmp_path):
    picture = images.fit_picture(images.Picture(_noise_picture()), WIDTH, HEIGHT, "crop")
    path = tmp_path / "picture.png"
    picture.save(path)
    job = dmd_job(image=str(path), fit="crop")
    latents = night(tmp_path / "night", job)["fox"]
    first_frame = stages.encode_first_frame(parts["vae"], picture, device="cpu")
    torch.testing.assert_close(latents[:, :, :1], first_frame, rtol=0, atol=0)
    # The staged plan embeds the per-frame timesteps once (t2v.frame_timesteps): within fp32 rounding.
    expected = reference(parts, seed=SEED, timesteps=FASTWAN, condition=first_frame)
    assert float((latents - expected).norm() / expected.norm()) < 1e-5


def _noise_picture():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(100, 150, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_a_stopped_dmd_diffusion_resumes_to_the_uninterrupted_latents(tmp_path):
    job = dmd_job(timesteps=samplers.TURBO_TIMESTEPS)

    def stop_after_second(stage, job, done):
        if done == 2:
            raise Stop

    first = _runner(tmp_path / "night", hooks=Hooks(on_step=(stop_after_second,)))
    first.run(ENCODE, job)
    with pytest.raises(Stop):
        first.run(DIFFUSE, job)
    assert first.store.has(CHECKPOINTS, first.keys(job)[DIFFUSE])
    done: list[int] = []
    second = _runner(tmp_path / "night", hooks=Hooks(on_step=(lambda s, j, n: done.append(n),)))
    second.run(DIFFUSE, job)
    assert done == [3, 4]  # steps 1-2 were not run again
    assert torch.equal(_latents(second, job), night(tmp_path / "reference", job)["fox"])


# --- keys --------------------------------------------------------------------------------------------


def test_the_model_schedulers_keys_are_unchanged_and_a_sampler_is_in_its_key():
    model = resolve_model("tiny")
    plain = JobSpec(template="fox", prompt=PROMPT, height=HEIGHT, width=WIDTH, frames=FRAMES, steps=3)
    parts = diffuse.key(KeyInputs(plain, model))
    assert "sampler" not in parts and "timesteps" not in parts
    assert diffuse.key(KeyInputs(replace(plain, sampler="model"), model)) == parts
    dmd = diffuse.key(KeyInputs(dmd_job(), model))
    assert dmd["sampler"] == dict(
        name="dmd", timesteps=[1000.0, 757.0, 522.0], sigma_shift=8.0, noise="sha256(seed/step)"
    )
    assert dmd["steps"] == 3 and dmd["guidance"] == 1.0
    assert diffuse.key(KeyInputs(dmd_job(timesteps=(1000, 750, 500)), model)) != dmd
    euler = diffuse.key(KeyInputs(replace(dmd_job(), sampler="euler"), model))
    assert euler["sampler"] == dict(name="euler", timesteps=[1000.0, 757.0, 522.0])


# --- a preset folder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fastwan_folder(tmp_path_factory) -> Path:
    """The tiny model saved as a diffusers folder, its model_index.json naming FastVideo's pipeline."""
    folder = tmp_path_factory.mktemp("models") / "fastwan"
    pipe = WanPipeline(
        tokenizer=tiny.build_tokenizer(),
        text_encoder=tiny.build_text_encoder(),
        transformer=tiny.build_transformer(),
        vae=tiny.build_vae(),
        scheduler=tiny.build_scheduler(),
        expand_timesteps=True,
    )
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanDMDPipeline"}))
    return folder


def _folder_runner(root: Path, folder: Path, hooks: Hooks | None = None) -> StageRunner:
    settings = Settings(data_dir=root, database_url=f"sqlite:///{root / 'runs.db'}")
    root.mkdir(parents=True, exist_ok=True)
    run_id = RunLog(settings.runlog_url).start_run(kind="nightly", model=str(folder))
    ctx = RunContext(run_id=run_id, model=str(folder), outputs_dir=root / "out", settings=settings)
    return StageRunner(ctx, hooks=hooks)


def test_a_folder_naming_wandmdpipeline_loads_by_its_components_with_the_dmd_preset(fastwan_folder, tmp_path):
    ref = resolve_model(str(fastwan_folder))
    assert ref.rules.preset == samplers.FASTWAN and ref.kind == "pretrained"
    catalogue = tmp_path / "templates.toml"
    catalogue.write_text(
        f"[defaults]\nheight = {HEIGHT}\nwidth = {WIDTH}\nframes = {FRAMES}\nsteps = 8\nguidance = 5.0\n"
        f'\n[[template]]\nname = "preset"\nprompt = "{PROMPT}"\nseed = {SEED}\n'
        f'\n[[template]]\nname = "own"\nprompt = "{PROMPT}"\nseed = {SEED}\nsampler = "model"\nsteps = 2\n'
    )
    preset, own = Catalogue.from_file(catalogue, ref.rules).jobs
    # The preset where the template names no sampler: its timesteps, its step count, guidance off.
    assert (preset.sampler, preset.timesteps, preset.steps, preset.guidance) == ("dmd", FASTWAN, 3, 1.0)
    assert (own.sampler, own.steps, own.guidance) == ("model", 2, 5.0)  # unless the template says so
    # A job that names no sampler keys and runs as its preset; the folder's scheduler serves "model".
    unresolved = JobSpec(
        template="preset", prompt=PROMPT, height=HEIGHT, width=WIDTH, frames=FRAMES, seed=SEED
    )
    assert diffuse.key(KeyInputs(unresolved, ref)) == diffuse.key(KeyInputs(preset, ref))
    steps: list[int] = []
    runner = _folder_runner(
        tmp_path / "night", fastwan_folder, Hooks(on_step=(lambda s, j, n: steps.append(n),))
    )
    for stage in (ENCODE, DIFFUSE):
        for job in (preset, own):
            runner.run(stage, job)
    assert steps == [1, 2, 3, 1, 2]
    latents = _latents(runner, preset)
    assert latents.shape == SHAPE and torch.isfinite(latents).all()


def test_a_folder_of_a_pipeline_neither_diffusers_nor_t2v_knows_is_one_clear_error(fastwan_folder, tmp_path):
    import shutil

    folder = Path(shutil.copytree(fastwan_folder, tmp_path / "mystery"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "MysteryVideoPipeline"}))
    with pytest.raises(ModelNotFound, match="names pipeline 'MysteryVideoPipeline', which is neither"):
        resolve_model(str(folder))
    shutil.rmtree(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanDMDPipeline"}))
    with pytest.raises(ModelNotFound, match=r"not a Wan2.2 TI2V diffusers folder .*missing \['vae'\]"):
        resolve_model(str(folder))


# --- input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(sampler="lcm"), "`sampler` must be one of model, euler, dmd (or unset: the model's own)"),
        (dict(sampler="dmd", timesteps=(522, 757, 1000)), "`timesteps` must be strictly decreasing"),
        (dict(sampler="dmd", timesteps=(1000, 1000, 500)), "`timesteps` must be strictly decreasing"),
        (dict(sampler="dmd", timesteps=(1200, 757)), "`timesteps` must each lie between 0 and 1000"),
        (dict(sampler="euler", timesteps=(1000, -1)), "`timesteps` must each lie between 0 and 1000"),
        (dict(sampler="dmd", timesteps="1000,lots"), "`timesteps` must be a list of numbers"),
        (dict(sampler="dmd", timesteps=(1000, True)), "`timesteps` must be a list of numbers"),
        (dict(timesteps=(1000, 500)), "`timesteps` go with sampler euler or dmd"),
        (dict(sampler="euler"), "`sampler` needs `timesteps`"),
        (dict(sampler="dmd", timesteps=FASTWAN, guidance=5.0), "`guidance` must be 1 or less (off) with"),
        (dict(sampler="dmd", timesteps=FASTWAN, guidance=1.0, step_cache="mag"), "`step_cache` must not be"),
    ],
)
def test_bad_sampler_input_is_one_line_naming_the_field(changes, message):
    job = JobSpec(template="fox", prompt=PROMPT, **changes)
    with pytest.raises(InvalidInput) as caught:
        job.validate(WAN22_RULES)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_steps_follow_the_timesteps_and_guidance_is_off_unless_the_template_sets_it(tmp_path):
    assert JobSpec(template="a", prompt="p", sampler="euler", timesteps="1000, 600,200.5").steps == 3
    assert JobSpec(template="a", prompt="p", sampler="euler", timesteps=[1000, 600]).timesteps == (1000, 600)
    catalogue = tmp_path / "templates.toml"
    catalogue.write_text(
        '[defaults]\nguidance = 5.0\nsampler = "dmd"\ntimesteps = [1000, 757, 522]\n'
        '\n[[template]]\nname = "a"\nprompt = "p"\n'
        '\n[[template]]\nname = "b"\nprompt = "p"\nsampler = "euler"\n'
    )
    a, b = Catalogue.from_file(catalogue, WAN22_RULES).jobs
    assert (a.guidance, a.steps, b.guidance) == (1.0, 3, 5.0)  # [defaults]' guidance: off for dmd
    catalogue.write_text(catalogue.read_text() + '\n[[template]]\nname = "c"\nprompt = "p"\nguidance = 4.0\n')
    with pytest.raises(InvalidInput, match="template 'c': `guidance` must be 1 or less"):
        Catalogue.from_file(catalogue, WAN22_RULES)


def test_generate_takes_sampler_options(data_dir, monkeypatch):
    made = []
    monkeypatch.setattr(flows.generate, "generate", lambda job, **kw: made.append(job) or "clip.mp4")
    common = ["generate", "a fox", "--height", "64", "--width", "96", "--frames", "9"]
    result = CliRunner().invoke(app, [*common, "--sampler", "dmd", "--timesteps", "1000,757,522"])
    assert result.exit_code == 0, result.output
    assert (made[0].sampler, made[0].timesteps, made[0].steps, made[0].guidance) == ("dmd", FASTWAN, 3, 1.0)
    result = CliRunner().invoke(
        app, [*common, "--sampler", "dmd", "--timesteps", "1000,757", "--guidance", "5"]
    )
    assert result.exit_code == 2 and "`guidance` must be 1 or less (off) with sampler dmd" in result.stderr
