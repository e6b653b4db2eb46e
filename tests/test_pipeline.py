"""The stage registry: keys as before the registry, a stage added through the registry alone, and no
stage named anywhere but in its own module."""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import pytest

from flows.nightly import nightly
from t2v import pipeline
from t2v.jobs import JobSpec
from t2v.media import Watermark
from t2v.models.registry import resolve_model
from t2v.pipeline import PIPELINE, JobKeys, KeyInputs, Stage, Work, decode
from t2v.runlog import RunLog, sqlite_url

ROOT = Path(__file__).resolve().parents[1]


def _old_key(stage: str, **parts: object) -> str:
    blob = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _old_keys(job: JobSpec, identity: str, max_len: int, fp8: bool) -> tuple[str, str, str, str]:
    """The key recipe of t2v/runner.py's JobKeys.of before the registry (main at 40cc21c), as it was."""
    embeddings = _old_key(
        "encode",
        model=identity,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt if job.cfg else None,
        max_sequence_length=max_len,
    )
    latents = _old_key(
        "diffuse",
        model=identity,
        embeddings=embeddings,
        seed=job.seed,
        height=job.height,
        width=job.width,
        frames=job.frames,
        steps=job.steps,
        guidance=job.guidance,
        fp8=fp8,
        step_cache=job.step_cache,
    )
    frames = _old_key("decode", model=identity, latents=latents)
    watermark = asdict(job.watermark)
    if job.watermark.image:
        watermark["image"] = hashlib.sha256(Path(job.watermark.image).read_bytes()).hexdigest()
    clip = _old_key("watermark", frames=frames, fps=job.fps, watermark=watermark, max_bytes=20_000_000)
    return embeddings, latents, frames, clip


def test_store_keys_are_those_the_stages_had_before_the_registry(tmp_path):
    logo = tmp_path / "logo.png"
    from PIL import Image

    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(logo)
    model = resolve_model("tiny")
    base = JobSpec(template="fox", prompt="a fox", height=64, width=96, frames=9, steps=2)
    jobs = [
        base,
        replace(base, guidance=1.0, seed=7),
        replace(base, step_cache=0.1, fps=12),
        replace(base, watermark=Watermark(image=logo, opacity=0.5, corner="top-left")),
    ]
    for job in jobs:
        for fp8 in (False, True):
            keys = JobKeys.of(PIPELINE, KeyInputs(job, model, fp8=fp8))
            old = _old_keys(job, model.identity, model.rules.max_sequence_length, fp8)
            assert tuple(keys[stage] for stage in PIPELINE) == old
            assert keys.final == old[-1]  # the run log's job key too


def _caption(work: Work) -> None:
    frames = work.input_path(decode.STAGE)
    with work.run.store.writing(work.stage, work.key) as temp:
        temp.write_text(json.dumps({"prompt": work.job.prompt, "frame_bytes": frames.stat().st_size}))


CAPTION = Stage(
    name="caption",
    output="caption",
    suffix=".json",
    summary="Write the job's caption file; returns its store key.",
    task_name="write-caption",
    key=lambda k: {"prompt": k.job.prompt},
    compute=_caption,
    inputs=(decode.STAGE,),
)


@pytest.fixture
def caption_stage():
    pipeline.register(CAPTION, before=pipeline.CLIP)
    yield CAPTION
    pipeline.unregister(CAPTION)


def test_a_stage_added_through_the_registry_alone_runs_in_a_night_and_is_skipped_the_next(
    data_dir, write_catalogue, caption_stage
):
    catalogue = write_catalogue(
        {"name": "fox", "prompt": "a fox in snow"}, {"name": "owl", "prompt": "an owl"}
    )

    first = nightly(str(catalogue), "tiny")
    second = nightly(str(catalogue), "tiny")

    outputs = data_dir / "outputs" / date.today().isoformat()
    assert first["failed"] == {} and first["clips"] == {t: str(outputs / f"{t}.mp4") for t in ("fox", "owl")}
    captions = sorted((data_dir / "store" / "caption").rglob("*.json"))
    assert sorted(json.loads(p.read_text())["prompt"] for p in captions) == ["a fox in snow", "an owl"]
    runs = RunLog(sqlite_url(data_dir / "runlog.sqlite")).runs(limit=2)
    order = [s.name for s in pipeline.stages()]
    assert order == ["encode", "diffuse", "decode", "caption", "finish"]
    for run, status in ((runs[1], "ok"), (runs[0], "skipped")):
        for template in ("fox", "owl"):
            rows = [r for r in run["stages"] if r["template"] == template]
            assert sorted((r["stage"], r["status"]) for r in rows) == sorted((name, status) for name in order)
    assert second["clips"] == first["clips"]


def test_a_stage_must_come_after_the_stages_it_reads():
    with pytest.raises(ValueError, match="do not come before it"):
        pipeline.register(CAPTION, before=decode.STAGE)
    assert CAPTION not in pipeline.stages()


def _string_literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_stage_name_is_matched_outside_its_own_module():
    # Current names: "watermark", the last stage's old name, is now a job field and a post step's name.
    names = {s.name for s in PIPELINE}
    found = []
    for folder in ("t2v", "tasks", "flows", "deployments", "t2v_cli", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent.name == "pipeline":
                continue  # the registry: each stage's module names itself
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}:{line}: {value!r}" for line, value in _string_literals(path) if value in names]
    # The run log's upgrade of rows written under the last stage's old name names the new one.
    allowed = ("t2v/runlog/schema.py", "t2v/runlog/migrations/")
    assert [f for f in found if not f.startswith(allowed)] == []
    js = (ROOT / "t2v/dashboard/static/app.js").read_text()
    assert not [n for n in names if f'"{n}"' in js]


def test_no_module_is_over_about_400_lines():
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for folder in ("t2v", "tasks", "flows", "deployments", "t2v_cli", "bench")
        for path in (ROOT / folder).rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 420} == {}
