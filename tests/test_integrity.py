"""Nothing damaged is taken for a good output: stored files are checked against the digest recorded when
they were written, a damaged one is moved aside and computed again, published clips are files of their
own, and NaN never becomes a clip."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import av
import pytest
import torch

from flows.nightly import nightly
from t2v import stages
from t2v.context import RunContext
from t2v.engine import StageRunner
from t2v.errors import NonFiniteOutput, StoreDamaged
from t2v.jobs import JobSpec
from t2v.pipeline import CLIP, PIPELINE
from t2v.pipeline.decode import STAGE as DECODE
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.runlog import RunLog
from t2v.settings import Settings
from t2v.store import Store, publish

JOB = JobSpec(template="fox", prompt="a fox at dawn", height=64, width=96, frames=9, steps=2)


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture
def runner(tmp_path: Path) -> StageRunner:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
    run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
    return StageRunner(
        RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
    )


def _rows(runner: StageRunner) -> list[tuple[str, str]]:
    return [(r["stage"], r["status"]) for r in runner.runlog.run(runner.run_id)["stages"]]


def test_a_damaged_output_is_moved_aside_and_computed_again_in_the_same_night(data_dir, write_catalogue):
    catalogue = write_catalogue({"name": "fox", "prompt": "a fox"}, {"name": "owl", "prompt": "an owl"})
    nightly(str(catalogue), "tiny")
    store = Store(data_dir / "store")
    frames = next((data_dir / "store" / DECODE.folder).rglob("*.mkv"))
    clip = next((data_dir / "store" / CLIP.folder).rglob("*.mp4"))
    embeddings = next((data_dir / "store" / ENCODE.folder).rglob("*.safetensors"))
    frames.write_bytes(frames.read_bytes()[: frames.stat().st_size // 2])  # truncated to half
    clip.write_bytes(b"")  # a zero-byte clip
    data = bytearray(embeddings.read_bytes())
    data[-16:] = bytes(b ^ 0xFF for b in data[-16:])  # flipped bytes, same size
    embeddings.write_bytes(bytes(data))

    summary = nightly(str(catalogue), "tiny")

    assert summary["failed"] == {}
    run = RunLog(f"sqlite:///{(data_dir / 'runlog.sqlite').resolve()}").runs(limit=1)[0]
    damaged = sorted(r["stage"] for r in run["stages"] if r["status"] == "failed")
    assert damaged == sorted([ENCODE.name, DECODE.name, CLIP.name])
    assert all("StoreDamaged" in r["error"] for r in run["stages"] if r["status"] == "failed")
    quarantined = {
        p.name.split(".")[0] for p in (data_dir / "store" / "quarantine").rglob("*") if p.is_file()
    }
    assert quarantined == {frames.stem, clip.stem, embeddings.stem}
    for path in (frames, clip, embeddings):  # each computed again, whole, under its own key
        assert store.digests.check(path)[0].value == "ok"
    outputs = data_dir / "outputs" / date.today().isoformat()
    assert [_frames(outputs / f"{t}.mp4") for t in ("fox", "owl")] == [9, 9]


def test_a_published_clip_replaced_by_the_user_leaves_the_store_as_it_was(data_dir, write_catalogue):
    catalogue = write_catalogue({"name": "fox", "prompt": "a fox"})
    first = nightly(str(catalogue), "tiny")
    published = Path(first["clips"]["fox"])
    stored = next((data_dir / "store" / CLIP.folder).rglob("*.mp4"))
    original = stored.read_bytes()
    assert published.stat().st_ino != stored.stat().st_ino and published.read_bytes() == original

    published.write_bytes(b"someone else's clip")  # as `cp other.mp4 <outputs>/fox.mp4` does

    assert stored.read_bytes() == original
    second = nightly(str(catalogue), "tiny")
    assert second["failed"] == {}
    assert published.read_bytes() == original  # published again from the store, which is the truth


def test_publishing_the_same_bytes_again_leaves_the_file(tmp_path):
    source = tmp_path / "a.mp4"
    source.write_bytes(b"clip")
    dest = publish(source, tmp_path / "out" / "a.mp4")
    before = dest.stat().st_mtime_ns
    assert publish(source, dest) == dest and dest.stat().st_mtime_ns == before
    assert not list((tmp_path / "out").glob(".partial-*"))


def test_a_store_written_before_digests_were_kept_is_trusted_once_and_recorded(runner):
    for stage in (ENCODE, DIFFUSE):
        runner.run(stage, JOB)
    for sidecar in runner.store.root.rglob("*.sha256"):
        sidecar.unlink()  # as a store written by the code before digests
    runner = StageRunner(runner.ctx)  # a later night: a process that has checked nothing yet

    for stage in (ENCODE, DIFFUSE):
        runner.run(stage, JOB)

    assert _rows(runner)[-2:] == [(ENCODE.name, "skipped"), (DIFFUSE.name, "skipped")]
    assert len(list(runner.store.root.rglob("*.sha256"))) == 2


def test_a_damaged_input_fails_its_job_with_the_file_and_the_fix_then_its_stage_heals_it(runner):
    for stage in (ENCODE, DIFFUSE):
        runner.run(stage, JOB)
    latents = runner.store.path(DIFFUSE, runner.keys(JOB)[DIFFUSE])
    latents.write_bytes(latents.read_bytes()[:100])

    with pytest.raises(StoreDamaged, match=r"diffuse output .*latents|rerun --last") as raised:
        runner.run(DECODE, JOB)
    assert str(latents) in str(raised.value) and "t2v rerun --last" in str(raised.value)

    runner.run(DIFFUSE, JOB)  # the re-run's diffuse finds it gone and computes it
    runner.run(DECODE, JOB)
    assert runner.store.check(DECODE, runner.keys(JOB)[DECODE])[0].value == "ok"


def test_latents_that_are_not_finite_are_never_stored(runner, monkeypatch):
    runner.run(ENCODE, JOB)
    monkeypatch.setattr(stages, "denoise", lambda *args, **kwargs: torch.full((1, 4, 3, 4, 6), float("nan")))

    with pytest.raises(NonFiniteOutput, match="NaN"):
        runner.run(DIFFUSE, JOB)

    assert not runner.store.has(DIFFUSE, runner.keys(JOB)[DIFFUSE])
    assert _rows(runner)[-1] == (DIFFUSE.name, "failed")


def test_frames_that_are_not_finite_are_refused(runner, monkeypatch):
    vae = runner.hooks.load(runner.model, DECODE.component)
    latents = torch.full((1, vae.config.z_dim, 3, 4, 6), float("nan"))
    with pytest.raises(NonFiniteOutput, match="frames"):
        stages.decode_latents(vae, latents, device="cpu")


def test_every_stage_records_a_digest(runner):
    for stage in PIPELINE:
        runner.run(stage, JOB)
    for stage in PIPELINE:
        path = runner.store.path(stage, runner.keys(JOB)[stage])
        assert path.with_name(path.name + ".sha256").is_file(), stage.name
