"""Resumable diffusion: a diffusion killed after a step continues from its last saved state, and its
latents are bit-identical to an uninterrupted run's (the tiny model computes in fp32 on the CPU)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from test_crash import _nightly, _wait_for
from typer.testing import CliRunner

from t2v.context import RunContext
from t2v.engine import Hooks, StageRunner
from t2v.jobs import JobSpec
from t2v.pipeline.diffuse import CHECKPOINTS
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v_cli.main import app

JOB = JobSpec(template="fox", prompt="a fox at dusk", height=64, width=96, frames=9, steps=6)


class Stop(Exception):
    """Stands in for the process dying after a step."""


def _runner(root: Path, *, hooks: Hooks | None = None, every_s: float = 0.0) -> StageRunner:
    settings = Settings(
        data_dir=root, database_url=f"sqlite:///{root / 'runs.db'}", checkpoint_seconds=every_s
    )
    root.mkdir(parents=True, exist_ok=True)
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=root / "out", settings=settings)
    return StageRunner(ctx, hooks=hooks)


def _latents(runner: StageRunner, job: JobSpec = JOB) -> torch.Tensor:
    return runner.store.load_tensors(DIFFUSE, runner.keys(job)[DIFFUSE])["latents"]


def _uninterrupted(root: Path, job: JobSpec = JOB) -> torch.Tensor:
    reference = _runner(root)
    reference.run(ENCODE, job)
    reference.run(DIFFUSE, job)
    return _latents(reference, job)


def test_a_stopped_diffusion_continues_from_its_last_step_and_ends_bit_identical(tmp_path):
    steps_run = []

    def stop_after_third(stage, job, done):
        steps_run.append(done)
        if done == 3:
            raise Stop

    first = _runner(tmp_path / "night", hooks=Hooks(on_step=(stop_after_third,)))
    first.run(ENCODE, JOB)
    with pytest.raises(Stop):
        first.run(DIFFUSE, JOB)
    key = first.keys(JOB)[DIFFUSE]
    assert first.store.has(CHECKPOINTS, key) and not first.store.has(DIFFUSE, key)

    steps_run.clear()
    second = _runner(
        tmp_path / "night", hooks=Hooks(on_step=(lambda stage, job, done: steps_run.append(done),))
    )
    second.run(DIFFUSE, JOB)

    assert steps_run == [4, 5, 6]  # steps 1-3 were not run again
    assert torch.equal(_latents(second), _uninterrupted(tmp_path / "reference"))
    assert not second.store.has(CHECKPOINTS, key)  # gone once the latents are stored


def test_with_a_step_cache_nothing_is_saved_between_steps_but_every_step_is_reported(tmp_path):
    job = JobSpec(template="owl", prompt="an owl", height=64, width=96, frames=9, steps=4, step_cache=0.05)
    reported = []
    runner = _runner(
        tmp_path, hooks=Hooks(on_progress=(lambda stage, j, done, total: reported.append(done),))
    )
    runner.run(ENCODE, job)
    written = []
    runner.store.on_written = lambda stage, temp: written.append(stage.folder)
    reported.clear()
    runner.run(DIFFUSE, job)
    assert CHECKPOINTS.folder not in written
    assert reported == [0, 1, 2, 3, 4]  # the live night view still sees the steps


def test_no_checkpoint_is_written_before_its_interval(tmp_path):
    runner = _runner(tmp_path, every_s=3600.0)
    runner.run(ENCODE, JOB)
    written = []
    runner.store.on_written = lambda stage, temp: written.append(stage.folder)
    runner.run(DIFFUSE, JOB)
    assert written == [DIFFUSE.folder]


def test_kill_9_at_a_known_step_then_rerun_gives_the_uninterrupted_latents(data_dir, tmp_path):
    catalogue = tmp_path / "night" / "templates.toml"
    catalogue.parent.mkdir()
    fields = {k: getattr(JOB, k) for k in ("height", "width", "frames", "steps")}
    catalogue.write_text(
        "[defaults]\n"
        + "".join(f"{k} = {v}\n" for k, v in fields.items())
        + f'\n[[template]]\nname = "{JOB.template}"\nprompt = "{JOB.prompt}"\n'
    )
    proc = _nightly(data_dir, catalogue, T2V_PAUSE_AT="diffuse@3", T2V_CHECKPOINT_S="0")
    _wait_for(data_dir / "paused-at-diffuse@3", proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert list((data_dir / "store" / CHECKPOINTS.folder).rglob("*.safetensors"))

    result = CliRunner().invoke(app, ["rerun", "--last"])

    assert result.exit_code == 0, result.output
    stored = list((data_dir / "store" / DIFFUSE.folder).rglob("*.safetensors"))
    assert len(stored) == 1
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(stored[0]))["latents"], _uninterrupted(tmp_path / "reference"))
    assert not list((data_dir / "store" / CHECKPOINTS.folder).rglob("*.safetensors"))
