"""A night killed with kill -9 while it holds the `gpu` slot does not leave the next night waiting.

A run's GPU stages hold a lease-based slot of the `gpu` limit (tasks/stages.py; tests/test_tasks.py
checks the slot and its normal release). A process killed with kill -9 renews nothing, and only a
served Prefect's repossessor gives the slot back once the lease (60 s, the least Prefect's server
accepts) runs out: the session's test server runs no repossessor, so this drill starts a real `prefect
server start` (repossessor every second, leases on disk as tasks/stages.py recommends). Rather than
wait out the 60 s, it reads the killed night's lease from the server's lease files (it ends at most
60 s after the kill, and the repossessor leaves it alone while it lasts), then moves its end to now,
as the clock would, through the server's own lease storage: the repossessor frees the slot and the
next night gets it (about 35 s in all). Like the deployment test it runs only with
T2V_TEST_DEPLOYMENT=1, which `.ci/run` sets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from prefect_server import BIN, free_port, require_slow_tests, server_env

REPO = Path(__file__).resolve().parents[1]
LEASE_S = 60  # the lease on the run's `gpu` slot (tasks/stages.py)
REPOSSESSOR_LOOPS_S = 3.0
"""A few of the repossessor's 1 s loops: long enough for it to have wrongly freed a lease still running."""


def _poll(check: Callable[[], bool], timeout_s: float, what: str, procs=()) -> float:
    """Wait until `check()` is true; seconds it took. Fails on timeout or if a process in `procs` ends."""
    start = time.monotonic()
    while not check():
        for proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process ended ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not after {timeout_s} s")
        time.sleep(0.2)
    return time.monotonic() - start


def _spawn(stack: ExitStack, args: list, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own process group, killed with its group when `stack` closes."""
    out = stack.enter_context(open(log, "wb"))
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    stack.callback(_kill_group, proc)
    return proc


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # children left behind by a group leader that is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[dict[str, str], ExitStack]]:
    """A `prefect server start` on a free loopback port with a 1 s repossessor; the env to reach it and
    an ExitStack that stops every process started on it (the server last)."""
    require_slow_tests("a real Prefect server, two nights and a lease to expire")
    port = free_port()
    env = server_env(
        tmp_path,
        port,
        PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1",
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",
        PYTHONPATH=str(REPO),
    )
    with ExitStack() as stack:
        log = tmp_path / "server.log"
        server = _spawn(
            stack, [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2):
                    return True
            except OSError:
                return False

        _poll(healthy, 120, "prefect server start", [(server, log)])
        yield env, stack


def test_a_night_killed_holding_the_gpu_slot_does_not_block_the_next(served, write_catalogue, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage as LeaseStorage
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env, stack = served
    catalogue = write_catalogue({"name": "fox", "prompt": "a fox at dusk", "seed": 1})
    nightly = [sys.executable, "-m", "t2v_cli.main", "nightly", "--catalogue", str(catalogue)]
    data = Path(env["T2V_DATA_DIR"])

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        client = stack.enter_context(get_client(sync_client=True))
        client.upsert_global_concurrency_limit_by_name("gpu", 1)  # as `t2v deploy --gpus 1`

        def slot() -> int:
            """The `gpu` limit's taken slots: what blocks a waiter."""
            return client.read_global_concurrency_limit_by_name("gpu").active_slots

        # The first night pauses inside diffuse, holding the slot; then kill -9.
        log = tmp_path / "night1.log"
        first = _spawn(stack, nightly, env | {"T2V_PAUSE_AT": "diffuse"}, log)
        _poll((data / "paused-at-diffuse").exists, 120, "first night pausing at diffuse", [(first, log)])
        assert slot() == 1

        os.killpg(first.pid, signal.SIGKILL)
        killed_at = datetime.now(UTC)
        assert first.wait(timeout=30) == -signal.SIGKILL
        assert slot() == 1  # nobody gave it back: only the lease's expiry can

        # The server's record of it: one lease, the killed night's flow run's, ending <= 60 s after the
        # kill (its last renewal was before it). While it lasts, the repossessor leaves it alone.
        storage = LeaseStorage(Path(env["PREFECT_HOME"]) / "concurrency_leases")
        (lease_id,) = anyio.run(storage.read_active_lease_ids)
        lease = anyio.run(storage.read_lease, lease_id)
        (night,) = client.read_flow_runs()
        assert (lease.metadata.holder.type, lease.metadata.holder.id) == ("flow_run", night.id)
        left_s = (lease.expiration - killed_at).total_seconds()
        assert 0 < left_s <= LEASE_S + 1, left_s
        time.sleep(REPOSSESSOR_LOOPS_S)
        assert slot() == 1 and anyio.run(storage.read_lease, lease_id) is not None

        # The lease runs out: its end moved to now, as the clock would move it in `left_s` seconds.
        assert anyio.run(storage.renew_lease, lease_id, timedelta(0))
        freed_s = _poll(lambda: slot() == 0, 30, "the killed night's slot being freed")
        assert freed_s <= 10, freed_s  # the repossessor runs every second
        assert anyio.run(storage.read_lease, lease_id) is None

        # The next night gets the slot and finishes.
        log = tmp_path / "night2.log"
        second = _spawn(stack, nightly, env, log)
        try:
            assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            pytest.fail(f"the next night did not finish in 180 s:\n{log.read_text()[-3000:]}")
        assert "1 clip(s), 0 failed" in log.read_text()
        assert [p.name for p in (data / "outputs").rglob("*.mp4")] == ["fox.mp4"]
        assert slot() == 0
        print(f"slot freed {freed_s:.1f} s after the lease ran out ({left_s:.1f} s after the kill)")
