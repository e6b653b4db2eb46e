"""One-job nights inside a host memory limit (cgroup v2 `memory.max`, no swap), from a diffusers folder.

    python bench/host_ram.py save /tmp/wan              # the full-size random weights, save_pretrained
    python bench/host_ram.py nights /tmp/wan --out bench/results --cases ours:832x480x81:16,...

Each case is `who:resolution:memory_max_gib[:card_cap_gib]` (`none` for no limit; who is `ours`, t2v's
`generate`, `gguf`, the same with the transformer from `FOLDER.q8_0.gguf` (write it first with
`python -m t2v.models.gguf write FOLDER FOLDER.q8_0.gguf --type Q8_0`), or `stock`, diffusers'
WanPipeline with `enable_model_cpu_offload()`; the card is capped at
6 GiB unless the fourth field says otherwise: stock cannot place the transformer under 6 GiB at all). Each
night runs in a fresh process moved into its own cgroup before it imports anything; the cgroup's
`memory.peak` and `memory.events` say how high it went and whether the OOM killer ended it. Root and a
writable cgroup v2 hierarchy are needed (the GPU machine of the `device` tool has both). Results go to
`host_ram.json`: {who, resolution, memory_max_gib, finished, wall_s, cgroup_peak_gib, plans, gpu}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUPS = Path("/sys/fs/cgroup")
SIZES = {"1280x704x121": (704, 1280, 121), "832x480x81": (480, 832, 81), "96x64x9": (64, 96, 9)}
STEPS = 3
GGUF_TYPE = "Q8_0"


def save(folder: Path) -> None:
    """The full-size architecture with random weights, saved as a Wan2.2 diffusers folder."""
    sys.path.insert(0, str(REPO))
    import torch
    from diffusers import WanPipeline

    from t2v.models import fullsize, tiny
    from t2v.models.registry import COMPONENTS

    parts = {c: fullsize.build(c, dtype=torch.float32 if c == "vae" else torch.bfloat16) for c in COMPONENTS}
    pipe = WanPipeline(tokenizer=tiny.build_tokenizer(), scheduler=tiny.build_scheduler(), **parts)
    pipe.save_pretrained(folder)


def cgroup_for(name: str, memory_max_gib: float | None) -> Path:
    group = CGROUPS / name
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(f"{int(memory_max_gib * 2**30)}" if memory_max_gib else "max")
    (group / "memory.swap.max").write_text("0")
    return group


def night_command(who: str, folder: Path, resolution: str, data: Path) -> list[str]:
    height, width, frames = SIZES[resolution]
    if who == "stock":
        return [sys.executable, str(Path(__file__)), "stock", str(folder), resolution]
    # `gguf`: the folder with the GGUF transformer written beside it (`t2v.models.gguf write`).
    model = f"{folder}+{folder}.{GGUF_TYPE.lower()}.gguf" if who == "gguf" else str(folder)
    return [
        sys.executable, "-m", "t2v_cli.main", "generate", "a corgi running through fresh snow",
        "--model", model, "--height", str(height), "--width", str(width), "--frames", str(frames),
        "--steps", str(STEPS), "--out", str(data / "clip.mp4"),
    ]  # fmt: skip


def run_case(case: str, folder: Path, scratch: Path, timeout_s: float | None = None) -> dict:
    who, resolution, limit, *card = case.split(":")
    card_cap = None if card and card[0] == "none" else float(card[0]) if card else 6.0
    memory_max = None if limit == "none" else float(limit)
    group = cgroup_for(f"t2v-{who}-{resolution}-{limit}-{card_cap}", memory_max)
    data = scratch / f"data-{who}-{resolution}-{limit}-{card_cap}"
    env = os.environ | {
        "T2V_DATA_DIR": str(data),
        "T2V_VRAM_BUDGET_GB": str(card_cap) if card_cap else "",
        "T2V_HOOKS": "bench.night:gpu_machine_hooks",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DO_NOT_TRACK": "1",
    }
    evict_page_cache(folder)
    # The child joins the cgroup first (`sh` writes its own pid, then becomes the night).
    shell = f"echo $$ > {group}/cgroup.procs && exec " + " ".join(
        f"'{a}'" for a in night_command(who, folder, resolution, data)
    )
    start = time.perf_counter()
    child = subprocess.Popen(
        ["sh", "-c", shell], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    sampler = MemorySampler(group, child.pid)
    sampler.start()
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
        done = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        child.kill()
        stdout, stderr = child.communicate()
        stderr += f"\ntimed out after {timeout_s} s"
        done = subprocess.CompletedProcess(child.args, -9, stdout, stderr)
    finally:
        sampler.stop()
    wall = time.perf_counter() - start
    events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
    said = (done.stdout + done.stderr).splitlines()
    return {
        "who": who,
        "resolution": resolution,
        "memory_max_gib": memory_max,
        "card_cap_gib": card_cap,
        "finished": done.returncode == 0,
        "returncode": done.returncode,
        "oom_kills": int(events.get("oom_kill", 0)),
        "wall_s": wall,
        "cgroup_peak_gib": _peak(group),
        "plans": plans_of(data) if who != "stock" else None,
        "gpu": gpu_name(),
        "host_log": [line[-300:] for line in said if "on the host" in line or "page-locked" in line],
        "tail": (done.stdout + done.stderr)[-1500:],
        "memory": sampler.summary(),
    }


class MemorySampler(threading.Thread):
    """The cgroup's `memory.stat` (anonymous vs page cache vs unevictable) and the night's own
    `/proc/PID/status` every quarter second: what a peak was made of, and when (wall-clock times, to
    line up with the night's log)."""

    FIELDS = ("anon", "file", "active_file", "inactive_file", "file_mapped", "unevictable", "shmem", "kernel")

    def __init__(self, group: Path, pid: int, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.group, self.pid, self.every_s = group, pid, every_s
        self.samples: list[dict] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            sample = {"clock": time.strftime("%H:%M:%S"), "t_s": round(time.perf_counter(), 2)}
            try:
                stat = dict(line.split() for line in (self.group / "memory.stat").read_text().splitlines())
                sample |= {k: round(int(stat[k]) / 2**30, 2) for k in self.FIELDS if k in stat}
                sample["current"] = round(int((self.group / "memory.current").read_text()) / 2**30, 2)
                status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
                for line in status:
                    name, _, value = line.partition(":")
                    if name in ("RssAnon", "RssFile", "RssShmem", "VmLck", "VmPin"):
                        sample[name] = round(int(value.split()[0]) / 2**20, 2)
            except (OSError, ValueError, KeyError):
                pass
            self.samples.append(sample)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def summary(self) -> dict:
        """The largest anonymous use, the last samples before the end (a kill's cause), one a second."""
        if not self.samples:
            return {}
        most = max(self.samples, key=lambda s: s.get("anon", 0))
        return {"max_anon": most, "last": self.samples[-6:], "every_second": self.samples[::4]}


def evict_page_cache(folder: Path) -> None:
    """Drop the folder's files (and a GGUF beside it) from the page cache, as after a reboot: what the
    night reads is then charged to its own cgroup and reclaimed under its limit. Pages left cached by
    the `save` (or an earlier night) belong to another group, which the limit never sees."""
    files = [p for p in folder.rglob("*") if p.is_file()] + list(folder.parent.glob(f"{folder.name}.*.gguf"))
    for path in files:
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _peak(group: Path) -> float | None:
    try:
        return int((group / "memory.peak").read_text()) / 2**30  # kernels from 5.19
    except (OSError, ValueError):
        return None


def plans_of(data: Path) -> dict | None:
    db = data / "runlog.sqlite"
    if not db.exists():
        return None
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT stage, plan, status, peak_cgroup_gib FROM stage_runs ORDER BY id"
        ).fetchall()
    return {stage: {"plan": plan, "status": status, "cgroup_gib": peak} for stage, plan, status, peak in rows}


def gpu_name() -> str:
    found = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return found.stdout.strip().splitlines()[0] if found.returncode == 0 else "none"


def stock(folder: Path, resolution: str) -> None:
    """diffusers' own low-memory recipe for the anchor: model offload, VAE tiling."""
    import torch
    from diffusers import WanPipeline

    height, width, frames = SIZES[resolution]
    cap = float(os.environ.get("T2V_VRAM_BUDGET_GB") or 0)
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total)
    pipe = WanPipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    pipe.vae.to(torch.float32)
    pipe.enable_model_cpu_offload()
    pipe.vae.enable_tiling()
    pipe(
        "a corgi running through fresh snow",
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=STEPS,
    )


def nights(folder: Path, cases: list[str], out: Path, scratch: Path, timeout_s: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for case in cases:
        print(f"--- {case}", flush=True)
        record = run_case(case, folder, scratch, timeout_s)
        records.append(record)
        (out / "host_ram.json").write_text(json.dumps(records, indent=1))
        shown = {k: v for k, v in record.items() if k not in ("tail", "plans")}
        print(json.dumps(shown), flush=True)
        if not record["finished"]:
            print(record["tail"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("save", "nights", "stock"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("resolution", nargs="?", default="832x480x81")
    parser.add_argument("--cases", default="ours:832x480x81:none,ours:832x480x81:16")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--scratch", type=Path, default=Path("/tmp/t2v-host-ram"), help="the nights' data folders"
    )
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds a night may take")
    args = parser.parse_args()
    if args.what == "save":
        save(args.folder)
    elif args.what == "stock":
        stock(args.folder, args.resolution)
    else:
        nights(args.folder, args.cases.split(","), args.out, args.scratch, args.case_timeout)


if __name__ == "__main__":
    main()
