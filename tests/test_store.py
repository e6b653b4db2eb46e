import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from t2v.pipeline import decode, encode, finish
from t2v.store import Store, make_key, publish


def _partial(store: Store, pid: int, name: str) -> Path:
    path = store.root / "decode" / "ab" / f".partial-{pid}-{name}.mkv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    return path


def test_sweep_partials_keeps_files_that_a_live_process_is_writing(tmp_path):
    store = Store(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = _partial(store, int(gone.stdout), "dead")
    live = _partial(store, os.getpid(), "live")
    # Same pid as this process but older than it: left by an earlier process that had our pid.
    recycled = _partial(store, os.getpid(), "recycled")
    old = time.time() - 10 * 24 * 3600
    os.utime(recycled, (old, old))

    assert store.sweep_partials() == 2
    assert live.exists() and not dead.exists() and not recycled.exists()


def test_sweep_partials_does_not_take_a_thread_for_the_dead_writer(tmp_path):
    # Linux gives threads ids from the pids' counter: once the ids wrap, a dead writer's pid can name a
    # live thread of another process, which writes nothing under that name.
    store = Store(tmp_path)
    started, stop, ids = threading.Event(), threading.Event(), []

    def run() -> None:
        ids.append(threading.get_native_id())
        started.set()
        stop.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(30) and ids[0] != os.getpid()
        by_a_thread = _partial(store, ids[0], "thread")
        assert store.sweep_partials() == 1
        assert not by_a_thread.exists()
    finally:
        stop.set()
        thread.join()


def test_sweep_partials_keeps_a_live_publish_even_of_an_old_clip(tmp_path):
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"a whole clip")
    old = time.time() - 10 * 24 * 3600
    os.utime(source, (old, old))
    copying = tmp_path / "outputs" / f".partial-{os.getpid()}-clip.mp4"
    copying.parent.mkdir()
    shutil.copyfile(source, copying)  # as `publish` does, just before it renames the copy into place

    assert Store(tmp_path / "outputs").sweep_partials() == 0
    assert copying.exists()


def test_publishing_a_clip_again_leaves_no_temporary_file(tmp_path):
    # A re-run publishes what the killed night had published already: nothing may be left behind.
    source = tmp_path / "store" / "clip.mp4"
    source.parent.mkdir()
    source.write_bytes(b"a clip")
    dest = tmp_path / "outputs" / "fox.mp4"

    assert publish(source, dest) == dest
    assert publish(source, dest) == dest

    assert sorted(p.name for p in dest.parent.iterdir()) == ["fox.mp4"]
    # A file of its own: writing over the published clip leaves the stored one as it was.
    assert dest.read_bytes() == b"a clip" and not os.path.samefile(source, dest)


def test_a_stages_files_live_under_its_folder_with_its_suffix(tmp_path):
    store = Store(tmp_path)
    key = make_key(encode.STAGE.folder, prompt="a fox")
    assert store.path(encode.STAGE, key) == tmp_path / "encode" / key[:2] / f"{key}.safetensors"
    assert store.path(decode.STAGE, key).suffix == ".mkv"
    # Renamed from "watermark": its stored clips keep their folder.
    assert store.path(finish.STAGE, key) == tmp_path / "watermark" / key[:2] / f"{key}.mp4"

    assert not store.has(encode.STAGE, key)
    tensors = {"cond": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert store.save_tensors(encode.STAGE, key, tensors) == store.path(encode.STAGE, key)
    assert store.has(encode.STAGE, key) and not store.has(decode.STAGE, key)
    assert torch.equal(store.load_tensors(encode.STAGE, key)["cond"], tensors["cond"])

    with pytest.raises(RuntimeError, match="killed"), store.writing(decode.STAGE, key) as temp:
        temp.write_bytes(b"half a file")
        raise RuntimeError("killed")
    assert not store.has(decode.STAGE, key) and list(store.path(decode.STAGE, key).parent.iterdir()) == []
