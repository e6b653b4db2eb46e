"""Ctrl-C, SIGTERM and kill -9 of a real `t2v nightly` that starts its own temporary Prefect server.

Each night is a `python -m t2v_cli.main nightly` subprocess in a session of its own, without
PREFECT_API_URL (so t2v starts the temporary server, as on a user's machine), paused by T2V_PAUSE_AT in a
stage's worker thread: the signal lands while the main thread waits for the stage and a worker thread
sleeps, the case where the process must still end without waiting for that thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prefect_server import free_port, seed_database

from t2v.runlog import RunLog, sqlite_url
from t2v_cli.interrupts import GRACE_S
from t2v_cli.server import TemporaryServer

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = """\
[defaults]
height = 64
width = 96
frames = 9
steps = 2

[[template]]
name = "fox"
prompt = "a fox at dusk"
seed = 1

[[template]]
name = "owl"
prompt = "an owl at dusk"
seed = 2
"""
STOP_S = 10.0
"""The issue's bound from the signal to the end of the process."""


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PREFECT_HOME for the module's nights, its database already migrated (`seed_database`)."""
    home = tmp_path_factory.mktemp("prefect")
    seed_database(home)
    return home


class Night:
    """A `t2v nightly` subprocess in its own session (process group id = its pid), output in files."""

    def __init__(self, tmp_path: Path, prefect_home: Path, pause_at: str) -> None:
        self.data_dir = tmp_path / "data"
        catalogue = tmp_path / "templates.toml"
        catalogue.write_text(CATALOGUE)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "T2V_"))}
        env |= {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "T2V_DATA_DIR": str(self.data_dir),
            "T2V_PAUSE_AT": pause_at,
            "PYTHONPATH": str(REPO),
        }
        self.marker = self.data_dir / f"paused-at-{pause_at}"
        self.server_pids: list[int] = []
        self.stderr_path = tmp_path / "stderr.txt"
        with open(tmp_path / "stdout.txt", "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "t2v_cli.main", "nightly", "--catalogue", str(catalogue)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # as a shell's job: the group a terminal's Ctrl-C goes to
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_paused(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.marker.exists():
            assert self.proc.poll() is None, f"nightly ended ({self.proc.returncode}):\n{self.stderr}"
            assert time.monotonic() < deadline, f"no {self.marker.name} after {timeout_s} s:\n{self.stderr}"
            time.sleep(0.05)

    def server(self) -> psutil.Process:
        """The temporary Prefect server t2v started (its launcher `python -m t2v_cli.server`)."""
        (server,) = [p for p in psutil.Process(self.proc.pid).children() if "t2v_cli.server" in p.cmdline()]
        self.server_pids.append(server.pid)
        return server


@pytest.fixture
def night(tmp_path: Path, prefect_home: Path) -> Iterator[Callable[[str], Night]]:
    started: list[Night] = []

    def start(pause_at: str) -> Night:
        started.append(Night(tmp_path, prefect_home, pause_at))
        return started[-1]

    yield start
    for each in started:  # a failed test leaves nothing running either
        for proc in _left(each.proc.pid, each.server_pids, wait_s=0):
            proc.kill()
        if each.proc.poll() is None:
            each.proc.kill()
            each.proc.wait()


def _left(pgid: int, pids: list[int], wait_s: float = 2.0) -> list[psutil.Process]:
    """Live processes of process group `pgid` or with one of `pids`, after up to `wait_s` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for proc in psutil.process_iter():
            try:
                ours = proc.pid in pids or os.getpgid(proc.pid) == pgid
                if ours and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
            except (psutil.Error, ProcessLookupError):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("signum", "to_group", "status"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c-to-the-group", "sigterm-to-t2v"],
)
def test_a_signal_stops_the_night_within_10_s_and_leaves_nothing(night, signum, to_group, status):
    # Ctrl-C in a terminal signals the whole foreground group; `kill PID` (a timeout, an operator) t2v alone.
    run = night("diffuse")
    run.wait_paused()
    server = run.server()

    t0 = time.monotonic()
    if to_group:
        os.killpg(run.proc.pid, signum)
    else:
        run.proc.send_signal(signum)
    code = run.proc.wait(timeout=STOP_S + 20)
    stopped_after_s = time.monotonic() - t0

    assert (code, stopped_after_s < STOP_S) == (status, True), (stopped_after_s, run.stderr)
    runlog = RunLog(sqlite_url(run.data_dir / "runlog.sqlite"))
    (killed,) = runlog.runs(limit=5)
    assert (killed["kind"], killed["status"]) == ("nightly", "interrupted")
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line == f"interrupted: run {killed['id']} stopped; `t2v rerun --last` finishes it"
    assert not _left(run.proc.pid, [server.pid]), "a process of t2v's group, or its Prefect server, is left"
    # The paused stage's row, left "running" by its worker thread, is closed by the next command's sweep.
    runlog.mark_interrupted()
    statuses = {(r["template"], r["stage"]): r["status"] for r in runlog.run(killed["id"])["stages"]}
    assert statuses[("fox", "diffuse")] == "interrupted" or statuses[("owl", "diffuse")] == "interrupted"
    assert "running" not in statuses.values()


def test_kill_9_of_t2v_takes_its_temporary_prefect_server_along(night):
    run = night("encode")
    run.wait_paused()
    server = run.server()
    assert server.ppid() == run.proc.pid and os.getsid(server.pid) == server.pid  # its own session

    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=10) == -signal.SIGKILL

    assert not _left(run.proc.pid, [server.pid]), "the temporary Prefect server outlived t2v"


def test_sigterm_ends_a_command_that_catches_ctrl_c_itself_with_143_at_once(tmp_path):
    # `t2v dashboard` stops serving on KeyboardInterrupt and returns: the signal still decides the status,
    # and with the main thread free the process ends without the watcher's grace.
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2V_")}
    env |= {"T2V_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "t2v_cli.main", "dashboard", "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().startswith("dashboard at http://127.0.0.1:")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_S)
    finally:
        proc.kill()

    assert (proc.returncode, err.strip().splitlines()[-1]) == (143, "interrupted"), err
    assert time.monotonic() - t0 < GRACE_S


HEALTH = """\
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""
EXITS = "raise SystemExit(3)"  # what uvicorn does when its port is taken


def _spawning(*programs: str) -> Callable[[TemporaryServer], None]:
    """A `TemporaryServer._spawn` running `programs` in turn instead of the Prefect server."""
    queue = list(programs)

    def spawn(self: TemporaryServer) -> None:
        self.port = free_port()
        self.server_process = subprocess.Popen([sys.executable, "-c", queue.pop(0), str(self.port)])

    return spawn


def test_a_temporary_server_that_does_not_come_up_is_started_once_more(monkeypatch):
    monkeypatch.setattr(TemporaryServer, "_spawn", _spawning(EXITS, HEALTH))
    server = TemporaryServer()

    server.start()

    try:
        assert server.running and server.server_process.poll() is None
        assert httpx.get(f"{server.api_url}/health").status_code == 200
    finally:
        server.stop()
    assert server.server_process is None and not server.running


def test_a_temporary_server_that_fails_twice_fails_the_command_with_both_reasons(monkeypatch):
    monkeypatch.setattr(TemporaryServer, "_spawn", _spawning(EXITS, EXITS))

    with pytest.raises(RuntimeError, match="exited with status 3; then it exited with status 3"):
        TemporaryServer().start()
