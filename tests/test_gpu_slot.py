"""A night killed with kill -9 while it holds the `gpu` slot does not leave the next night waiting.

A run's GPU stages hold a lease-based slot of the `gpu` limit (tasks/stages.py; tests/test_tasks.py
checks the slot and its normal release). A process killed with kill -9 renews nothing, and only a
served Prefect's repossessor gives the slot back once the lease (60 s) runs out: the session's test
server runs no repossessor, so this drill starts a real `prefect server start` (repossessor every
second, leases on disk as tasks/stages.py recommends) and takes about 90 s. Like the deployment test it
runs only with T2V_TEST_DEPLOYMENT=1, which `.ci/run` sets.
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
from pathlib import Path

import pytest
from prefect_server import BIN, free_port, require_slow_tests, server_env

REPO = Path(__file__).resolve().parents[1]
LEASE_S = 60  # the lease on the run's `gpu` slot (tasks/stages.py)


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
    require_slow_tests(f"a real Prefect server and a {LEASE_S} s lease to expire")
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
        assert first.wait(timeout=30) == -signal.SIGKILL
        assert slot() == 1  # nobody gave it back: only the lease's expiry can

        # The repossessor frees it once the lease runs out (<= 60 s after its last renewal).
        freed_s = _poll(lambda: slot() == 0, 2 * LEASE_S, "the killed night's slot being freed")
        assert freed_s <= LEASE_S + 15, freed_s

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
        print(f"slot freed {freed_s:.1f} s after the kill")
