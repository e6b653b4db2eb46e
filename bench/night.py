"""What the throughput benchmarks share: the night's prompts, a free port, a log line, and the
stand-in for ffmpeg on a machine without it (the GPU machine of the `device` tool)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

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


def frames_to_npy() -> None:
    """No ffmpeg: `t2v.media` saves lossless frames as .npy under the store's name, and a clip's
    "encoding" copies those frames. Every GPU-side step stays the product's own."""
    import shutil

    import numpy as np

    from t2v import media

    def write_frames_lossless(frames, dest, *, fps):
        with open(dest, "wb") as f:
            np.save(f, frames)

    def encode_mp4(source, dest, **_kwargs):
        shutil.copyfile(source, dest)

    media.write_frames_lossless = write_frames_lossless
    media.encode_mp4 = encode_mp4


def wait_for_server(api: str, proc: subprocess.Popen, log_path: Path, timeout: float = 180) -> float:
    """Seconds until the Prefect server at `api` answers its health check; raises if it exits first
    or does not answer in `timeout` seconds, with the end of its log."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer in {timeout} s:\n{_tail(log_path)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({type(exc).__name__}: {exc})"
