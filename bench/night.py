"""What the throughput benchmarks share: the night's prompts, a local Prefect server and its processes,
a log line, and the stand-in for ffmpeg on a machine without it (the GPU machine of the `device` tool).

The stand-in is a codec handed to the runner as a hook (`gpu_machine_hooks`), not a patch of
`t2v.media`: in this process through `t2v.engine.Hooks`, in a Prefect worker's flow-run processes through
`T2V_HOOKS=bench.night:gpu_machine_hooks` in the worker's environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from t2v.media import Codec

NEGATIVE = "blurry, low quality, static, distorted"
PROMPTS = [
    ("birthday", "A birthday cake with glowing candles on a wooden table, confetti falling, warm light"),
    ("holiday", "A snowy village at night with glowing windows and a decorated pine tree, gentle snowfall"),
    ("atom", "A glowing model of an atom rotating slowly above a classroom desk, soft blue light"),
    ("corgi", "A corgi in a red scarf runs through fresh snow at golden hour, slow motion"),
    ("ocean", "Waves roll onto a black sand beach under a pink sunset sky, seagulls overhead"),
    ("city", "A rainy neon street in Tokyo at night, reflections on wet asphalt, people with umbrellas"),
    ("forest", "Sunbeams through a misty pine forest at dawn, a deer steps into a clearing"),
    ("space", "A rocket lifts off from a launch pad at dusk, clouds of steam and orange flame"),
]
GPU_MACHINE_HOOKS = "bench.night:gpu_machine_hooks"
"""$T2V_HOOKS for flow-run processes on a machine without ffmpeg."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_ffmpeg() -> bool:
    from t2v import media

    try:
        media.ffmpeg_exe()
    except Exception:
        return False
    return True


class NpyCodec(Codec):
    """No ffmpeg: lossless frames are saved as .npy under the store's name, and a clip's "encoding"
    copies those frames (the published .mp4 then holds .npy data). Every GPU-side step stays the
    product's own."""

    def write_frames(self, frames: np.ndarray, dest: Path, *, fps: int) -> None:
        with open(dest, "wb") as f:  # a file, not a path: np.save would append .npy to the name
            np.save(f, frames)

    def read_frames(self, path: Path) -> np.ndarray:
        return np.load(path)

    def encode_clip(self, source: Path, dest: Path, *, fps: int, steps: Sequence, max_bytes: int = 0) -> None:
        shutil.copyfile(source, dest)


def gpu_machine_hooks():
    """The hooks a run needs on the GPU machine (no ffmpeg): the .npy codec. `T2V_HOOKS` names this."""
    from t2v.engine.hooks import Hooks

    return Hooks(codec=NpyCodec())


def night_templates(count: int, *, takes: bool) -> list[tuple[str, str, int]]:
    """`count` (name, prompt, seed) with distinct names, seeds 1..count: the night both benchmarks
    make. Past `PROMPTS` the prompts repeat, or with `takes` end in ", take <n>" (as each benchmark's
    earlier results had them: a repeated prompt is encoded once)."""
    out = []
    for i in range(count):
        name, prompt = PROMPTS[i % len(PROMPTS)]
        if i >= len(PROMPTS):
            name = f"{name}-{i}"
            prompt = f"{prompt}, take {i // len(PROMPTS) + 1}" if takes else prompt
        out.append((name, prompt, i + 1))
    return out


def start_prefect_server(home: Path, base_env: Mapping[str, str]) -> tuple[subprocess.Popen, dict[str, str]]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (its log is
    `<home>/server.log`); returns (process, the Prefect variables that point a client at it)."""
    port = free_port()
    prefect_env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    # No runs from a deployment's cron schedules: only the ones a benchmark triggers.
    server_env = dict(base_env) | prefect_env | {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "server.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, prefect_env


def prefect_server(
    home: Path, base_env: Mapping[str, str], api: str | None = None
) -> tuple[subprocess.Popen | None, dict[str, str]]:
    """`start_prefect_server`, or with `api` (`--prefect-api`: a server already running, such as a test
    session's) none started: (None, the Prefect variables that point a client at `api`, with `home` as
    this process's PREFECT_HOME)."""
    if api is None:
        return start_prefect_server(home, base_env)
    home.mkdir(parents=True, exist_ok=True)
    return None, {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def wait_for_server(api: str, proc: subprocess.Popen | None, log_path: Path, timeout: float = 180) -> float:
    """Seconds until the Prefect server at `api` answers its health check; raises if it exits first
    (`proc`, None for a server this script did not start) or does not answer in `timeout` seconds,
    with the end of its log."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer in {timeout} s:\n{tail(log_path)}")


def stop(proc: subprocess.Popen | None, grace_s: float = 10) -> None:
    """Terminate `proc` (kill after `grace_s`), then any of its descendants still alive (flow runs);
    None (a server this script did not start) is left alone."""
    import psutil

    if proc is None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({type(exc).__name__}: {exc})"


def without_run_settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without its Prefect or t2v settings: the base of a server's and workers'."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if not k.startswith(("PREFECT_", "T2V_"))}
