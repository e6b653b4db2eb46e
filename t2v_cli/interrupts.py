"""Ctrl-C and SIGTERM: a command stops within seconds, exit status 130 or 143, no child left behind.

Ctrl-C raises KeyboardInterrupt in the main thread and SIGTERM is made to do the same (`Terminated`), so
both unwind the way the flows already handle: `flows.night.run_stages` records the run `interrupted`
(as `RunLog.stage` does a stage row the main thread is in). Prefect turns a SIGTERM during a flow into
its own `TerminationSignal`, another BaseException, with the same effect.

The main thread may then be held: Prefect joins its task worker threads on the way out, and one may be
in the middle of a stage (or in the 10-minute T2V_PAUSE_AT sleep). So a watcher thread, woken by the
signal itself through `signal.set_wakeup_fd` (written by the C-level handler whichever Python handler is
installed, Prefect's included), ends the process `GRACE_S` after the first signal unless the main thread
got there first: every child process ended (the temporary Prefect server among them), one line on
stderr saying how to finish the run, then `os._exit`, which waits for no worker thread and no exit hook.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, NoReturn

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""128 + the signal's number, as a shell reports a process the signal ended."""
GRACE_S = 3.0
"""How long the main thread gets after the signal to unwind (the run's row, Prefect's report of the
flow run) before the watcher ends the process; it takes well under a second when it is not held."""
CHILDREN_S = 2.0
"""How long child processes get after SIGTERM before SIGKILL."""
LOOKUP_S = 2.0
"""How long finding the interrupted run in the run log may take before the line goes without its id."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, to unwind the same way."""


class Interrupts:
    """Installs the handlers for one command (`with Interrupts() as interrupts:`) and ends the process
    after a signal (`interrupts.exit()`, or the watcher). Outside the main thread it does nothing:
    only the main thread can handle signals."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first of SIGINT or SIGTERM the process got while installed, else None."""
        self._lock = threading.Lock()
        self._raised = False
        self._exiting = False
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = self._pipe = os.pipe()
        os.set_blocking(write_fd, False)  # set_wakeup_fd wants it; a full pipe drops bytes, not signals
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in EXIT_STATUS:
            self._previous[signum] = signal.signal(signum, self._handle)
        threading.Thread(target=self._watch, args=(read_fd,), name="t2v-interrupts", daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pipe is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._pipe[1])  # the watcher reads end-of-file and stops (unless counting down an exit)
        self._pipe = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._notice(signum)
        if self._pipe is not None:
            try:  # wake the watcher also where someone replaced the wakeup fd
                os.write(self._pipe[1], bytes([signum]))
            except OSError:
                pass
        if not self._raised:
            # Once: a second Ctrl-C must not break the unwinding of the first (the run's row, the
            # server's report); the watcher ends the process in time anyway.
            self._raised = True
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def _notice(self, signum: int) -> None:
        with self._lock:
            if self.signum is None and signum in EXIT_STATUS:
                self.signum = signum

    def _watch(self, read_fd: int) -> None:
        while self.signum is None:
            try:
                data = os.read(read_fd, 64)  # one byte per signal, its number
            except OSError:
                data = b""
            if not data:  # end of file: the command ended without a signal
                os.close(read_fd)
                return
            for signum in data:
                self._notice(signum)
        # The read end stays open to the end: a later signal's byte written to a closed pipe would be
        # reported on stderr by Python (`Exception ignored when trying to write to the signal wakeup fd`).
        time.sleep(GRACE_S)
        self.exit()

    def exit(self) -> NoReturn:
        """End the process after a signal: children ended, one line on stderr, status 130 or 143.

        Called by the main thread once the signal has unwound it and by the watcher if it has not
        within the grace; the first one does it, the other waits for the end.
        """
        assert self.signum is not None, "exit() is for after a signal"
        status = EXIT_STATUS[self.signum]
        with self._lock:
            first, self._exiting = not self._exiting, True
        if not first:
            time.sleep(CHILDREN_S + LOOKUP_S + 5.0)  # the other one is on its way out, within bounds
            os._exit(status)
        try:
            line = _in_thread(stopped_run_line)  # meanwhile, the children end
            end_children(CHILDREN_S)
            sys.stdout.flush()
            print(line(LOOKUP_S) or "interrupted", file=sys.stderr, flush=True)
        finally:
            os._exit(status)


def _in_thread(call: Callable[[], str]) -> Callable[[float], str | None]:
    """Start `call()` in a thread; the returned function waits up to its argument in seconds for the
    result, None if `call` raised or is still at it (a database that does not answer)."""
    result: list[str] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception:
            pass

    thread = threading.Thread(target=run, name="t2v-interrupted-run", daemon=True)
    thread.start()

    def wait(timeout_s: float) -> str | None:
        thread.join(timeout_s)
        return result[0] if result else None

    return wait


def stopped_run_line() -> str:
    """The line a stopped command prints: which run of this process stopped and how to finish it."""
    if "t2v.context" not in sys.modules:  # a run starts through t2v.context; no run, nothing to open
        return "interrupted"
    from t2v.context import open_runlog
    from t2v.settings import Settings

    host, pid = socket.gethostname(), os.getpid()
    runs = open_runlog(Settings.from_env().runlog_url).runs(limit=20)
    run = next((r for r in runs if (r["host"], r["pid"]) == (host, pid)), None)
    if run is None:  # stopped before its run started, or a command that starts none (`t2v dashboard`)
        return "interrupted"
    if run["status"] not in ("running", "interrupted"):
        return f"interrupted after run {run['id']} ended {run['status']}"
    if run["kind"] == "generate":
        return f"interrupted: run {run['id']} stopped; the same `t2v generate` again finishes it"
    return f"interrupted: run {run['id']} stopped; `t2v rerun --last` finishes it"


def end_children(timeout_s: float) -> None:
    """SIGTERM to every process this one started (and theirs), SIGKILL to those left after `timeout_s`."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)
