"""The temporary Prefect server of a command run without PREFECT_API_URL, started so that it neither
stops before t2v on Ctrl-C nor outlives it.

Prefect starts that server itself (`prefect.server.api.server.SubprocessASGIServer`) the first time a
flow needs an API and none is configured. Left to Prefect, the server shares t2v's process group, so a
terminal's Ctrl-C stops it first and t2v's report of the interrupted run ends in `Connection refused`
after minutes of retries; nothing stops it when t2v dies without running its exit hooks (SIGTERM's
default action, kill -9), so it stays behind under PID 1; and it gets 20 s to answer, which a busy 2-core
machine missed.

`TemporaryServer` runs the same uvicorn command in a session of its own, through this module as a
launcher (`python -m t2v_cli.server PARENT_PID UVICORN_ARGS...`) that kills the server once its parent
process is gone; it waits up to 90 s for the server to answer and starts it a second time if the first
did not. `prefect_server_hook()` hands it to Prefect under the key Prefect looks its server up by, as
`prefect.testing.utilities.prefect_test_harness` does, at the moment Prefect imports its server module:
Prefect imports it only to start a temporary server, and importing it ourselves would cost every
command about 6 s on a busy 2-core machine, even one stopped by bad input or sent to a configured server.

Only the standard library is imported here, so that `t2v --help` and the launcher stay quick.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

SERVER_MODULE = "prefect.server.api.server"
LAUNCHER = "t2v_cli.server"
"""This module, run as the launcher of the server."""
STARTUP_S = 90.0
"""How long the server gets to answer /api/health. Prefect's default of 20 s failed two nights on a busy
2-core machine, where a new database's migrations and the app's imports compete for the cores."""
ATTEMPTS = 2
"""A server that did not come up (timed out, exited, lost its port to another process) is started once
more on a fresh port before the command fails."""
STOP_S = 3.0
"""How long a stopping server gets after SIGTERM before SIGKILL."""
PARENT_POLL_S = 0.2
"""How often the launcher checks that its parent is alive."""


class TemporaryServer:
    """Prefect's temporary server (the command of `SubprocessASGIServer._run_uvicorn_command`), in a
    session of its own and ended with its parent. Prefect's client, events and log workers use it as
    they use their own: `start()`, `api_url`, `server_process`, `stop()`."""

    def __init__(self, startup_s: float = STARTUP_S) -> None:
        self.port: int | None = None
        self.server_process: subprocess.Popen[bytes] | None = None
        self.running = False
        self._startup_s = startup_s
        # Prefect's flow engine and its events and log worker threads may each ask for the server.
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until it answers; once per process, like Prefect's."""
        with self._lock:
            if self.running:
                return
            budget = max(timeout or 0.0, self._startup_s, _prefect_startup_setting())
            problems: list[str] = []
            for _ in range(ATTEMPTS):
                self._spawn()
                problem = self._wait_until_healthy(budget)
                if problem is None:
                    self.running = True
                    # At exit, after Prefect's own exit hooks registered later (LIFO) have sent their
                    # last logs and events to it; an interrupted command ends it in t2v_cli.interrupts.
                    atexit.register(self.stop)
                    return
                problems.append(problem)
                self._end()
            raise RuntimeError(
                f"the temporary Prefect server did not start ({'; then '.join(problems)}); "
                "set PREFECT_API_URL to a running server (`prefect server start`) instead."
            )

    def stop(self) -> None:
        with self._lock:
            self._end()
            self.running = False

    def _spawn(self) -> None:
        from prefect.settings import get_current_settings

        self.port = _free_port()
        prefect_dir = os.path.dirname(sys.modules["prefect"].__file__ or "")
        uvicorn_args = [
            *("--app-dir", os.path.dirname(prefect_dir)),
            *("--factory", f"{SERVER_MODULE}:create_app"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--log-level", "error", "--lifespan", "on"),
        ]
        env = {
            **os.environ,
            # What Prefect sets for its temporary server: no UI, ephemeral-mode services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        self.server_process = subprocess.Popen(
            [sys.executable, "-m", LAUNCHER, str(os.getpid()), *uvicorn_args],
            env=env,
            stdin=subprocess.DEVNULL,
            # Its own session and process group: a terminal's Ctrl-C (and a signal to t2v's group)
            # reaches t2v alone, which needs the server to record how its flow run ended.
            start_new_session=True,
        )

    def _wait_until_healthy(self, budget_s: float) -> str | None:
        """None once /api/health answers 200; else what went wrong."""
        import httpx

        assert self.server_process is not None
        deadline = time.monotonic() + budget_s
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.server_process.poll()
                if code is not None:
                    return f"it exited with status {code}"
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return None
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    return f"{self.api_url}/health did not answer within {budget_s:.0f} s"
                time.sleep(0.1)

    def _end(self) -> None:
        process, self.server_process = self.server_process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_S)


def _prefect_startup_setting() -> float:
    """PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, where a user raised it above our margin."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(module: ModuleType) -> None:
    """Make `SubprocessASGIServer()` (how Prefect asks for its temporary server) return a TemporaryServer,
    unless a server is registered already (a test harness)."""
    module.SubprocessASGIServer._instances.setdefault(None, TemporaryServer())


@contextmanager
def prefect_server_hook() -> Iterator[None]:
    """While a command runs: `register` the temporary server when Prefect imports its server module.

    A process that imported that module already (a test harness, a program embedding the CLI) decides
    about its servers itself, and is left alone.
    """
    if SERVER_MODULE in sys.modules:
        yield
        return
    finder = _AfterImport(SERVER_MODULE, register)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then(module)` once `name` has been imported (executed), then steps aside."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one import only; also keeps the lookup below from finding us
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, then: Callable[[ModuleType], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name: str) -> object:  # get_code, get_source, is_package... of the real loader
        return getattr(self.loader, name)


def _end_with(parent: int) -> None:
    """Kill this process once `parent` is gone (its pid is no longer our parent's).

    A poll rather than prctl(PR_SET_PDEATHSIG): that signal comes when the *thread* that started the
    server ends, and Prefect may start it from one of its worker threads while t2v goes on.
    """
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def serve(parent: int, uvicorn_args: list[str]) -> None:
    """The launcher: uvicorn as `python -m uvicorn` runs it, with a thread that ends it with `parent`."""
    threading.Thread(target=_end_with, args=(parent,), name="t2v-end-with-parent", daemon=True).start()
    sys.argv = ["uvicorn", *uvicorn_args]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # python -m t2v_cli.server PARENT_PID UVICORN_ARGS...
    serve(int(sys.argv[1]), sys.argv[2:])
