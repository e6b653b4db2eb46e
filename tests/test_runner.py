"""The StageRunner's overlap of work: frames written while the next job decodes, and the next stage's
component loaded in the background while the current stage runs. Real runner, built-in model, CPU."""

import threading
import time
from pathlib import Path

import pytest
import torch

from t2v import media, stages
from t2v.context import RunContext
from t2v.engine import Hooks, Residency, StageRunner, residency, runner
from t2v.jobs import JobSpec
from t2v.models.registry import load_component
from t2v.pipeline.decode import STAGE as DECODE
from t2v.pipeline.diffuse import STAGE as DIFFUSE
from t2v.pipeline.encode import STAGE as ENCODE
from t2v.runlog import RunLog
from t2v.settings import Settings, get_settings
from t2v.store import Store

SIZE = dict(height=64, width=96, frames=9, steps=2)
JOBS = [JobSpec(template=t, prompt=f"a {t} at dawn", seed=i, **SIZE) for i, t in enumerate(("fox", "sea"))]


@pytest.fixture
def make_runner(tmp_path: Path, data_dir: Path):
    def make(load=load_component) -> StageRunner:
        settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'runs.db'}")
        run_id = RunLog(settings.runlog_url).start_run(kind="generate", model="tiny")
        ctx = RunContext(run_id=run_id, model="tiny", outputs_dir=tmp_path / "out", settings=settings)
        return StageRunner(ctx, hooks=Hooks(load=load))

    return make


def loads_in(loads: list, component: str):
    """A component loader that notes, for `component`, the thread that loaded it."""

    def load(ref, name):
        if name == component:
            loads.append(threading.current_thread().name)
        return load_component(ref, name)

    return load


def test_a_jobs_frames_are_written_after_the_card_is_free_for_the_next_decode(make_runner, monkeypatch):
    stage_runner = make_runner()
    for job in JOBS:
        stage_runner.run(ENCODE, job)
        stage_runner.run(DIFFUSE, job)
    second_decoding = threading.Event()
    real_decode = stages.decode_latents
    real_write = media.write_frames_lossless

    def decode_latents(vae, latents, **kwargs):
        if threading.current_thread().name == "second":
            second_decoding.set()
        return real_decode(vae, latents, **kwargs)

    def write_frames(frames, path, **kwargs):
        # The first job's write waits until the second job is decoding: it would wait forever (and
        # fail below) if the runner held the card while writing.
        if threading.current_thread().name == "first":
            assert second_decoding.wait(timeout=30), "the next decode did not start while frames were written"
        real_write(frames, path, **kwargs)

    monkeypatch.setattr(stages, "decode_latents", decode_latents)
    monkeypatch.setattr(media, "write_frames_lossless", write_frames)
    keys, errors = {}, []

    def decode(job: JobSpec) -> None:
        try:
            keys[job.template] = stage_runner.run(DECODE, job)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    first = threading.Thread(target=decode, args=(JOBS[0],), name="first")
    first.start()
    while not stage_runner.store.root.joinpath(DECODE.folder).exists() and first.is_alive():
        threading.Event().wait(0.01)  # the first decode has its frames once the writer made its folder
    second = threading.Thread(target=decode, args=(JOBS[1],), name="second")
    second.start()
    first.join(60)
    second.join(60)

    assert errors == []
    assert all(stage_runner.store.has(DECODE, keys[job.template]) for job in JOBS)
    rows = stage_runner.runlog.run(stage_runner.run_id)["stages"]
    decodes = sorted((r["template"], r["status"]) for r in rows if r["stage"] == DECODE.name)
    assert decodes == [("fox", "ok"), ("sea", "ok")]


def test_the_next_component_is_loaded_in_the_background_and_used_by_its_stage(make_runner, monkeypatch):
    loads = []
    stage_runner = make_runner(load=loads_in(loads, "transformer"))
    for job in JOBS:
        stage_runner.run(ENCODE, job)

    assert stage_runner.prefetch(DIFFUSE, JOBS[:1]) is True
    stage_runner.run(DIFFUSE, JOBS[0])

    assert len(loads) == 1 and loads[0].startswith("t2v-prefetch")
    # Already loaded: asking again for the other job starts nothing.
    stage_runner.prefetch(DIFFUSE, JOBS[1:])
    stage_runner.run(DIFFUSE, JOBS[1])
    assert len(loads) == 1


def test_nothing_is_prefetched_for_a_stage_whose_outputs_are_stored(make_runner, monkeypatch):
    stage_runner = make_runner()
    stage_runner.run(ENCODE, JOBS[0])
    stage_runner.run(DIFFUSE, JOBS[0])
    started = []
    monkeypatch.setattr(stage_runner.residency, "prefetch", lambda *args: started.append(args))

    assert stage_runner.prefetch(DIFFUSE, JOBS[:1]) is False
    assert stage_runner.prefetch(DECODE, JOBS[:1]) is True
    assert [name for name, *_ in started] == [DECODE.component]


def test_nothing_is_prefetched_where_the_host_lacks_the_room(make_runner, monkeypatch):
    monkeypatch.setattr(residency, "PREFETCH_ROOM", 1e12)  # no host has a million times the model free
    loads = []
    stage_runner = make_runner(load=loads_in(loads, "vae"))
    for stage in (ENCODE, DIFFUSE):
        stage_runner.run(stage, JOBS[0])

    stage_runner.prefetch(DECODE, JOBS[:1])
    stage_runner.run(DECODE, JOBS[0])

    assert len(loads) == 1 and not loads[0].startswith("t2v-prefetch")  # the stage loaded it itself


def test_a_failed_prefetch_leaves_the_stage_to_load_it_and_meet_the_error(make_runner, monkeypatch):
    calls = []

    def flaky(ref, name):
        if name == "transformer":
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                raise OSError("disk hiccup")
        return load_component(ref, name)

    stage_runner = make_runner(load=flaky)
    stage_runner.run(ENCODE, JOBS[0])
    stage_runner.prefetch(DIFFUSE, JOBS[:1])
    stage_runner.run(DIFFUSE, JOBS[0])

    assert len(calls) == 2 and calls[0].startswith("t2v-prefetch") and not calls[1].startswith("t2v-prefetch")


def test_prefetching_while_the_encoder_is_built_changes_no_weight(make_runner, tmp_path):
    # Both builders draw from torch's global generator, one in the prefetch thread: the latents must be
    # those of a run that built one component after the other.
    latents = []
    for prefetch in (False, True):
        stage_runner = make_runner()
        stage_runner.store = Store(tmp_path / f"store-{prefetch}")
        if prefetch:
            stage_runner.prefetch(DIFFUSE, JOBS[:1])
        stage_runner.run(ENCODE, JOBS[0])
        key = stage_runner.run(DIFFUSE, JOBS[0])
        latents.append(stage_runner.store.load_tensors(DIFFUSE, key)["latents"])

    assert torch.equal(latents[0], latents[1])


def test_a_job_waiting_for_the_card_has_no_row_yet_and_its_row_does_not_count_the_wait(
    make_runner, monkeypatch
):
    stage_runner = make_runner()
    for job in JOBS:
        stage_runner.run(ENCODE, job)
        stage_runner.run(DIFFUSE, job)
    inside, go_on = threading.Event(), threading.Event()
    real_decode = stages.decode_latents

    def decode_latents(vae, latents, **kwargs):
        if threading.current_thread().name == "first":
            inside.set()
            assert go_on.wait(timeout=30)
        return real_decode(vae, latents, **kwargs)

    monkeypatch.setattr(stages, "decode_latents", decode_latents)
    first = threading.Thread(target=stage_runner.run, args=(DECODE, JOBS[0]), name="first")
    second = threading.Thread(target=stage_runner.run, args=(DECODE, JOBS[1]), name="second")
    first.start()
    assert inside.wait(timeout=30)
    second.start()
    time.sleep(1.0)  # the second job is waiting for the card all this time

    def decode_rows():
        return [
            r for r in stage_runner.runlog.run(stage_runner.run_id)["stages"] if r["stage"] == DECODE.name
        ]

    assert [(r["template"], r["status"]) for r in decode_rows()] == [("fox", "running")]
    go_on.set()
    first.join(60)
    second.join(60)
    rows = {r["template"]: r for r in decode_rows()}
    assert (rows["fox"]["status"], rows["sea"]["status"]) == ("ok", "ok")
    assert rows["sea"]["wall_s"] < 1.0 < rows["fox"]["wall_s"]


def test_a_run_s_gpu_stages_collect_dropped_components_with_what_came_before_frozen(monkeypatch):
    import gc
    import weakref

    residency = Residency()
    with residency.held():
        assert gc.get_freeze_count() > 0  # what the process held before: out of the collector's walk
        module = torch.nn.Linear(2, 2)
        module.loop = [module]  # a reference cycle, as diffusers' hooks make one
        dropped = weakref.ref(module)
        residency.get("transformer", "tag", lambda held=module: held)
        del module
        residency.get("vae", "tag", lambda: torch.nn.Linear(2, 2))  # the stage change drops it
        assert dropped() is None  # collected although everything older is frozen
        assert residency._held
    assert gc.get_freeze_count() == 0 and not residency._held  # released, and the collector whole again


def test_compiled_kernels_are_kept_beside_the_store_unless_the_user_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("T2V_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert get_settings().inductor_dir == (tmp_path / "data").resolve() / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert get_settings().inductor_dir == tmp_path / "mine"


def test_a_compiling_run_imports_the_compiler_while_its_stage_waits_for_the_prefetch(
    make_runner, monkeypatch
):
    imported = threading.Event()
    seen = {}

    def slow_load(ref, name):
        # Still loading until the stage has imported the compiler (or 10 s, and the test fails).
        if name == "text_encoder":
            seen["import_came_first"] = imported.wait(timeout=10)
        return load_component(ref, name)

    stage_runner = make_runner(load=slow_load)
    stage_runner.compile_blocks = True  # as on a GPU with T2V_COMPILE=on; the encode stage compiles nothing

    def import_compiler():
        seen["importer"] = threading.current_thread().name
        imported.set()

    monkeypatch.setattr(runner, "import_compiler", import_compiler)
    stage_runner.prefetch(ENCODE, JOBS[:1])
    stage_runner.run(ENCODE, JOBS[0])

    assert seen == {"import_came_first": True, "importer": threading.current_thread().name}


def test_a_load_that_is_done_or_a_run_that_does_not_compile_waits_for_nothing_else(make_runner, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "import_compiler", lambda: calls.append("import"))
    plain = make_runner()
    plain.prefetch(ENCODE, JOBS[:1])
    plain.run(ENCODE, JOBS[0])  # compiles nothing: no import, loaded ahead or not
    compiling = make_runner()
    compiling.compile_blocks = True
    assert compiling.prefetch(ENCODE, JOBS[1:])  # the other job: the store has the first's
    compiling.residency._ahead["text_encoder"][1].result()  # loaded before its stage asks
    compiling.run(ENCODE, JOBS[1])

    assert calls == []


def test_a_stage_never_loads_its_component_while_the_loader_thread_loads_another(make_runner):
    # from_pretrained patches nn.Module process-wide while it builds: two loads at once put one
    # model's parameters on the meta device (seen on the GPU machine).
    active, most = [], []
    lock = threading.Lock()

    def load(ref, name):
        with lock:
            active.append(name)
            most.append(len(active))
        time.sleep(0.2)
        try:
            return load_component(ref, name)
        finally:
            with lock:
                active.remove(name)

    stage_runner = make_runner(load=load)
    stage_runner.prefetch(DIFFUSE, JOBS[:1])  # the transformer, in the loader thread
    stage_runner.run(ENCODE, JOBS[0])  # the encoder, on this thread, at the same time
    stage_runner.run(DIFFUSE, JOBS[0])

    assert len(most) == 2 and max(most) == 1
