"""The dashboard's HTTP server: one HTML page, its vendored scripts, JSON from the run log, the clips
and the first frames of image jobs.

The standard library's threading HTTP server is enough for one person's browser on loopback and adds
no dependency. A clip's outputs (its MP4s, poster and preview) are served by store key only: a key is
32 hex digits, the suffix one of the finish stage's (`finish.FILE_TYPES`), and the file is looked up in
the store's folder of the clip stage's outputs, so no request path ever becomes a file path, and `..`
or an absolute path cannot reach another file. An image job's first frame is served by its store key
too (`/first-frames/<key>.png`), and only a key that a night this server listed checked against the
run log (`first_frames`), its picture hashed again before it is drawn.

The page has no login, so every request must name this server in its Host header: a page on another
site that rebinds its own DNS name to 127.0.0.1 reaches the port, but its requests still carry its name
(see `_host_allowed`).

A night still "running" in the run log may be one whose process died (kill -9, the OOM killer): before
answering with one, the server closes the rows of dead processes (`RunLog.mark_interrupted`, at most
every `SWEEP_S`), so the page shows it interrupted at its last known step instead of running forever.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from t2v.dashboard import first_frames, live, summary
from t2v.pipeline import CLIP, finish
from t2v.runlog import NoSuchRun, RunLog
from t2v.store import Folder, Store

__all__ = ["Dashboard", "make_server"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Only these files are served from the static folder, whatever the request asks for.
STATIC_FILES = {
    "chart.umd.js": "text/javascript; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_KEY = re.compile(r"[0-9a-f]{32}")
_CLIP_FILE = re.compile(r"/clips/([0-9a-f]{32})(\.[a-z0-9]{3,4})")
_FIRST_FRAME = re.compile(r"/first-frames/([0-9a-f]{32})\.png")
_MAX_FIRST_FRAMES = 1024
_RUN_ID = re.compile(r"[0-9a-zA-Z_-]{1,32}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# A Host header: a DNS name or IPv4 address, or an IPv6 address in brackets, then maybe a port.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[0-9a-z.-]+)(?::(\d{1,5}))?")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
_CHUNK = 256 * 1024
_MAX_NIGHTS = 200
SWEEP_S = 5.0
"""Seconds between two sweeps for dead processes' rows, however often the page polls."""
_HISTORY_NIGHTS = 10
# The page loads only its own files; style-src allows the inline styles Chart.js puts on its canvas.
_CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'"


@dataclass(frozen=True)
class Dashboard:
    """What the server reads: the run log and the store that holds the clips."""

    runlog: RunLog
    store: Store
    nights: int = 30
    """How many runs the page lists and charts, newest first."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        try:
            if not self._host_allowed():
                # 421: this server is not the one the browser meant. Nothing of the run log is sent.
                self._error(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    "wrong Host header; open the dashboard as http://"
                    + " or http://".join(sorted(self.server.host_names))
                    + " (with the port)",
                )
            elif path in ("/", "/index.html"):
                self._file(STATIC_DIR / "index.html", "text/html; charset=utf-8", body=body)
            elif path.startswith("/static/") and path[len("/static/") :] in STATIC_FILES:
                name = path[len("/static/") :]
                self._file(STATIC_DIR / name, STATIC_FILES[name], body=body)
            elif path == "/api/nights":
                self._nights(parse_qs(url.query), body=body)
            elif path.startswith("/api/nights/"):
                self._night(path[len("/api/nights/") :], body=body)
            elif match := _CLIP_FILE.fullmatch(path):
                self._clip(match[1], match[2], body=body)
            elif match := _FIRST_FRAME.fullmatch(path):
                self._first_frame(match[1], body=body)
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser moved on (a video seek cancels its request); nothing to answer
        except Exception as exc:
            log.exception("dashboard request %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    def _host_allowed(self) -> bool:
        """Whether the request's one Host header names this server (any port: an `ssh -L` may differ).

        The port is not checked because it protects nothing: a rebinding page's requests carry the
        attacker's host name, which is what is refused; a loopback name with another port is only a
        browser that was forwarded here.
        """
        values = self.headers.get_all("Host") or []
        if len(values) != 1:
            return False
        match = _HOST.fullmatch(values[0].strip().lower())
        return match is not None and match.group(1) in self.server.host_names

    # --- answers ---------------------------------------------------------------------------------

    def _json(self, value: Any, *, body: bool, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self._headers("application/json", len(data))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message}, body=self.command != "HEAD", status=status)

    def _headers(self, content_type: str, length: int) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)

    def _file(self, path: Path, content_type: str, *, body: bool) -> None:
        data = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self._headers(content_type, len(data))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _nights(self, query: dict[str, list[str]], *, body: bool) -> None:
        limit = self.server.dashboard.nights
        if "limit" in query:
            try:
                limit = min(max(int(query["limit"][0]), 0), _MAX_NIGHTS)
            except ValueError:
                self._error(HTTPStatus.BAD_REQUEST, "`limit` must be a whole number")
                return
        runlog = self.server.dashboard.runlog
        runs = runlog.runs(limit=limit)
        if any(r["status"] == "running" for r in runs) and self.server.sweep():
            runs = runlog.runs(limit=limit)  # a dead night's rows were closed: read them as they are now
        running = [r for r in runs if r["status"] == "running"]
        progress = runlog.progress([r["id"] for r in running]) if running else {}
        listed = summary.nights(runs)
        for night, run in zip(listed, runs, strict=True):
            night["live"] = (
                live.view(run, progress[run["id"]], known=live.history(runs, before=run["started"]))
                if run["id"] in progress
                else None
            )
        self._json(
            {"stages": list(summary.stage_names()), "nights": listed, "trends": summary.trends(runs)},
            body=body,
        )

    def _night(self, run_id: str, *, body: bool) -> None:
        if not _RUN_ID.fullmatch(run_id):
            self._error(HTTPStatus.NOT_FOUND, "no such run")
            return
        runlog = self.server.dashboard.runlog
        try:
            run = runlog.run(run_id)
            if run["status"] == "running" and self.server.sweep():
                run = runlog.run(run_id)
        except NoSuchRun:
            self._error(HTTPStatus.NOT_FOUND, f"no run {run_id} in the run log")
            return
        night = summary.night(run)
        _add_live(night, run, runlog)
        frames = first_frames.first_frames(run)
        for job in night["jobs"]:
            _add_outputs(job, self.server.dashboard.store)
            frame = frames.get(job["template"])
            # An image job's first frame, or the note saying why it is not shown; neither for text-only.
            job["first_frame"] = frame.describe() if isinstance(frame, first_frames.FirstFrame) else None
            job["first_frame_note"] = frame if isinstance(frame, str) else None
            if isinstance(frame, first_frames.FirstFrame):
                self.server.remember(frame)
        self._json(night, body=body)

    def _first_frame(self, key: str, *, body: bool) -> None:
        frame = self.server.first_frame(key)
        data = first_frames.png(frame) if frame is not None else None
        if data is None:
            self._error(HTTPStatus.NOT_FOUND, "no such first frame")
            return
        self.send_response(HTTPStatus.OK)
        self._headers("image/png", len(data))
        # The key names the content (the picture's bytes, size, fit and model): it never changes.
        self.send_header("Cache-Control", "max-age=86400, immutable")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _clip(self, key: str, suffix: str, *, body: bool) -> None:
        store = self.server.dashboard.store
        kind = Folder(CLIP.folder, suffix)
        if suffix not in finish.FILE_TYPES or not _KEY.fullmatch(key) or not store.has(kind, key):
            self._error(HTTPStatus.NOT_FOUND, "no such clip")
            return
        path = store.path(kind, key)
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        # Browsers fetch video in byte ranges (and will not seek without them).
        wanted = self.headers.get("Range")
        if wanted:
            match = _RANGE.fullmatch(wanted.strip())
            if match is None or match.groups() == ("", ""):
                self._unsatisfiable(size)
                return
            first, last = match.groups()
            if first == "":  # the last N bytes
                start = max(size - int(last), 0)
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start >= size or start > end:
                self._unsatisfiable(size)
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self._headers(finish.FILE_TYPES[suffix], end - start + 1)
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as handle:
            handle.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = handle.read(min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def _unsatisfiable(self, size: int) -> None:
        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


def _add_live(night: dict[str, Any], run: dict[str, Any], runlog: RunLog) -> None:
    """The live view of a night (`t2v.dashboard.live`): its progress rows, the panel of a running or
    interrupted night, the memory timeline, the stage attempts marked on it and each figure's peak."""
    progress = runlog.progress([run["id"]])[run["id"]]
    samples = runlog.timeline(run["id"])
    known = {}
    if run["status"] == "running":  # what an earlier night's stages cost, for the estimate
        known = live.history(runlog.runs(limit=_HISTORY_NIGHTS), before=run["started"])
    marked = live.segments(run, samples)
    night["progress"] = [
        {k: p[k] for k in ("template", "stage", "step", "steps", "updated")} for p in progress
    ]
    night["live"] = live.view(run, progress, known=known)
    night["timeline"] = live.timeline(samples)
    night["segments"] = marked
    night["timeline_peaks"] = live.peaks(samples, marked)


def _add_outputs(job: dict[str, Any], store: Store) -> None:
    """A job's outputs as the store lists them under its clip key (`finish.outputs_in_store`), each with
    its URL and download name; the clip key becomes its first MP4's, the one the page plays."""
    listed = finish.outputs_in_store(store, job["clip_key"]) if job["clip_key"] else []
    job["outputs"] = [
        {
            "name": out["name"],
            "url": f"/clips/{out['key']}{out['suffix']}",
            "file": f"{job['template']}{out['tail']}",
            "type": finish.FILE_TYPES[out["suffix"]],
        }
        for out in listed
    ]
    job["clip_key"] = listed[0]["key"] if listed else None
    for kind in ("poster", "preview"):
        job[kind] = next((out["url"] for out in job["outputs"] if out["name"] == kind), None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.host_names = frozenset(LOOPBACK_NAMES) | {_host_name(address[0])}
        # The first frames the listed nights named, by key: the only ones `/first-frames/` serves.
        self._first_frames: dict[str, first_frames.FirstFrame] = {}
        self._first_frames_lock = threading.Lock()
        self._sweep_lock = threading.Lock()
        self._swept = -SWEEP_S
        super().__init__(address, _Handler)

    def sweep(self) -> bool:
        """Close the rows of dead processes (`RunLog.mark_interrupted`) unless that was done in the last
        `SWEEP_S`; whether it ran. A run log this server may not write to is only read."""
        with self._sweep_lock:
            if time.monotonic() - self._swept < SWEEP_S:
                return False
            self._swept = time.monotonic()
            try:
                self.dashboard.runlog.mark_interrupted()
            except Exception as exc:  # a read-only copy of a run log: show it as it is
                log.warning("could not close the rows of dead processes: %s", exc)
                return False
            return True

    def remember(self, frame: first_frames.FirstFrame) -> None:
        with self._first_frames_lock:
            self._first_frames.pop(frame.key, None)
            self._first_frames[frame.key] = frame
            while len(self._first_frames) > _MAX_FIRST_FRAMES:
                del self._first_frames[next(iter(self._first_frames))]  # the least recently listed

    def first_frame(self, key: str) -> first_frames.FirstFrame | None:
        with self._first_frames_lock:
            return self._first_frames.get(key)


def _host_name(host: str) -> str:
    """`host` as a Host header writes it: lower case, an IPv6 address in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def make_server(dashboard: Dashboard, *, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A bound, not yet serving, server; port 0 picks a free port (read it from `server_address`).

    It answers only requests whose Host header is 127.0.0.1, localhost, [::1] or `host` (any port);
    others get 421 and no data.

    Call `serve_forever()` on it, and `shutdown()` from another thread to stop it.
    """
    return _Server((host, port), dashboard)
