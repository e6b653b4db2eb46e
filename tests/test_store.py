import os
import subprocess
import sys
import time
from pathlib import Path

from t2v.store import Store


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
