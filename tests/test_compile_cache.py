"""A night compiles the transformer's blocks after fewer steps where Inductor's cache holds its shapes
compiled by an earlier night (`t2v.compile_cache`, `plans.compile_pays`)."""

from dataclasses import replace
from pathlib import Path

import pytest
from diffusers import WanTransformer3DModel

from t2v.compile_cache import RECORD, CompiledShapes, shape_key
from t2v.context import RunContext, start_run
from t2v.engine import StageRunner
from t2v.jobs import JobSpec
from t2v.models.registry import resolve_model
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.plans import COMPILE_PAYS_AFTER_STEPS, COMPILE_PAYS_AFTER_WARM_STEPS, compile_pays
from t2v.runlog import RunLog
from t2v.settings import Settings

JOB = JobSpec(template="owl", prompt="an owl", height=64, width=96, frames=9, steps=2)


def test_a_warm_cache_pays_back_within_one_clip_a_cold_one_after_four():
    assert COMPILE_PAYS_AFTER_WARM_STEPS < 50 < COMPILE_PAYS_AFTER_STEPS
    assert compile_pays([50], warm=True) and not compile_pays([50])
    assert not compile_pays([20], warm=True)
    assert not compile_pays([50], "off", warm=True)


def test_the_record_holds_only_what_was_added_and_survives_a_damaged_file(tmp_path: Path):
    record = CompiledShapes(tmp_path)
    assert not record.holds(["a"]) and not record.holds([])
    record.add(["a", "b"])
    assert record.holds(["a"]) and record.holds(["a", "b"]) and not record.holds(["a", "c"])
    (tmp_path / RECORD).write_text("{not json")
    assert not record.holds(["a"])  # unreadable: cold, and the next compile writes it again
    record.add(["c"])
    assert record.holds(["c"])


def test_a_compiled_night_records_its_shapes_and_the_next_night_compiles_from_one_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    compiled = []
    # The compile itself is the GPU's (the runner compiles only there); its bookkeeping is tested here.
    monkeypatch.setattr(
        WanTransformer3DModel, "compile_repeated_blocks", lambda self, **kw: compiled.append(kw)
    )
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
    night = [replace(JOB, steps=50)]
    assert (
        start_run("nightly", night, settings=settings, model="tiny", outputs_dir=tmp_path).compile_blocks
        is False
    )

    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    runner = StageRunner(
        RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
    )
    runner.compile_blocks = True
    runner.run(ENCODE, JOB)
    runner.run(DIFFUSE, JOB)
    assert compiled == [{"dynamic": False}]
    identity = resolve_model("tiny").identity
    assert CompiledShapes(settings.inductor_dir).holds([shape_key(JOB, identity)])

    warm = start_run("nightly", night, settings=settings, model="tiny", outputs_dir=tmp_path)
    assert warm.compile_blocks is True  # 50 steps at shapes compiled before
    other = [JobSpec(template="owl", prompt="an owl", height=96, width=64, frames=9, steps=50)]
    assert (
        start_run("nightly", other, settings=settings, model="tiny", outputs_dir=tmp_path).compile_blocks
        is False
    )


def test_a_larger_clips_steps_count_for_their_larger_saving(tmp_path: Path):
    # A compiled 720P step saved 0.32 s on the H200, a 480P one 0.11: two 50-step 720P clips repay a
    # cold compile that four 480P clips are needed for; below 480P a step counts as one, as measured.
    from t2v.plans import compile_weight

    assert compile_weight(8_190) == 1.0 == compile_weight(18)
    assert compile_weight(27_280) == pytest.approx(0.32 / 0.11)
    assert 1.0 < compile_weight(15_000) < compile_weight(27_280) < compile_weight(40_000)
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")

    def compiles(count: int, **size: int) -> bool:
        night = [replace(JOB, template=f"t{i}", steps=50, **size) for i in range(count)]
        return start_run(
            "nightly", night, settings=settings, model="tiny", outputs_dir=tmp_path
        ).compile_blocks

    p720, p480 = dict(height=704, width=1280, frames=121), dict(height=480, width=832, frames=81)
    assert not compiles(1, **p720) and compiles(2, **p720)
    assert not compiles(3, **p480) and compiles(4, **p480)
