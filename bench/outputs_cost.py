"""What a clip's outputs cost on the CPU: all of them in one ffmpeg run against the single MP4 of before.

For a 480P x 81 and a 720P x 121 clip (synthetic footage: moving soft blobs over a gradient with a little
grain, stored lossless as the decode stage stores frames), each case is made `--repeats` times through
the library's own `t2v.media` functions from a job's outputs (`t2v.outputs.made_of`), timing CPU
seconds (ffmpeg's, from the children's rusage, plus this process's) and wall seconds:

- `mp4`: the native MP4 with its watermark, the one file a night made per template before outputs;
- `all-crop`: native, 16:9, 9:16, 1:1 and 4:5 crops, a JPEG poster and a WebP preview in one run;
- `all-pad`: the same with the three narrower aspects padded over a blurred copy;
- `all-gif`: `all-crop` with a GIF preview (palette generation);
- `separate`: `all-crop`'s files, each made in an ffmpeg run of its own (what one run saves).

    python bench/outputs_cost.py --out bench/results --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from t2v.jobs import JobSpec
from t2v.media import Render, encode_outputs, write_frames_lossless
from t2v.outputs import made_of

SIZES = {"480P": (832, 480, 81), "720P": (1280, 704, 121)}
FPS = 24
ASPECTS = ("native", "16:9", "9:16", "1:1", "4:5")
CASES: dict[str, dict[str, object]] = {
    "mp4": {},
    "all-crop": {"outputs": ASPECTS, "poster": "middle", "preview": "webp"},
    "all-pad": {
        "outputs": ("native", "16:9", *({"aspect": a, "fill": "pad"} for a in ("9:16", "1:1", "4:5"))),
        "poster": "middle",
        "preview": "webp",
    },
    "all-gif": {"outputs": ASPECTS, "poster": "middle", "preview": "gif"},
}


def footage(width: int, height: int, frames: int, seed: int = 0) -> np.ndarray:
    """uint8 (F, H, W, 3): a diagonal gradient, four soft coloured blobs drifting across it, and grain
    (+-3 levels), so that every frame differs and the encoders see texture as well as smooth areas."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 120 + 40
    centres = rng.uniform(0, 1, size=(4, 2)) * (width, height)
    speeds = rng.uniform(-3, 3, size=(4, 2))
    colours = rng.uniform(-90, 90, size=(4, 3))
    radius = 0.15 * min(width, height)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        frame = base.copy()
        for (cx, cy), (vx, vy), colour in zip(centres, speeds, colours, strict=True):
            blob = np.exp(-(((x - cx - vx * i) ** 2 + (y - cy - vy * i) ** 2) / (2 * radius**2)))
            frame += blob[..., None] * colour
        frame += rng.integers(-3, 4, size=frame.shape)
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


def _job(width: int, height: int, frames: int, case: dict[str, object]) -> JobSpec:
    return JobSpec(
        template="bench", prompt="bench", width=width, height=height, frames=frames, fps=FPS, **case
    )


def _renders(job: JobSpec, folder: Path) -> list[Render]:
    return [Render(folder / f"out{m.tail}", m.steps, m.encoding) for m in made_of(job)]


def _timed(work: Callable[[], None]) -> tuple[float, float]:
    """(CPU seconds of this process and its finished children, wall seconds) of `work()`."""
    before_self, before_kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    start = time.perf_counter()
    work()
    wall = time.perf_counter() - start
    after_self, after_kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu = sum(
        getattr(after, f) - getattr(before, f)
        for after, before in ((after_self, before_self), (after_kids, before_kids))
        for f in ("ru_utime", "ru_stime")
    )
    return cpu, wall


def measure(source: Path, job: JobSpec, folder: Path, *, separate: bool, repeats: int) -> dict[str, object]:
    """Median CPU and wall seconds of making the job's outputs from `source`, and each file's bytes."""
    renders = _renders(job, folder)

    def once() -> None:
        for group in [[r] for r in renders] if separate else [renders]:
            encode_outputs(source, group, fps=FPS)

    runs = [_timed(once) for _ in range(repeats)]
    return {
        "files": len(renders),
        "cpu_s": statistics.median(cpu for cpu, _ in runs),
        "wall_s": statistics.median(wall for _, wall in runs),
        "runs_cpu_s": [round(cpu, 3) for cpu, _ in runs],
        "bytes": {r.dest.name: r.dest.stat().st_size for r in renders},
    }


def bench_size(name: str, repeats: int, work: Path) -> dict[str, object]:
    width, height, frames = SIZES[name]
    source = work / f"{name}.mkv"
    write_frames_lossless(footage(width, height, frames), source, fps=FPS)
    results: dict[str, object] = {"size": f"{width}x{height}x{frames}", "source_bytes": source.stat().st_size}
    for case, fields in CASES.items():
        folder = work / name / case
        folder.mkdir(parents=True)
        results[case] = measure(
            source, _job(width, height, frames, fields), folder, separate=False, repeats=repeats
        )
        print(
            f"{name} {case}: {results[case]['cpu_s']:.2f} CPU s, {results[case]['wall_s']:.2f} s", flush=True
        )
    folder = work / name / "separate"
    folder.mkdir()
    results["separate"] = measure(
        source, _job(width, height, frames, CASES["all-crop"]), folder, separate=True, repeats=repeats
    )
    return results


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(results: dict[str, dict]) -> str:
    rows = ["| clip | case | files | CPU s | x the MP4 | wall s |", "|---|---|---|---|---|---|"]
    for name, sized in results.items():
        anchor = sized["mp4"]["cpu_s"]
        for case in (*CASES, "separate"):
            r = sized[case]
            rows.append(
                f"| {name} {sized['size']} | {case} | {r['files']} | {r['cpu_s']:.2f} | "
                f"{r['cpu_s'] / anchor:.2f} | {r['wall_s']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 480P, 720P")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2v-outputs-cost-") as tmp:
        results = {name: bench_size(name, args.repeats, Path(tmp)) for name in args.sizes.split(",")}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "repeats": args.repeats,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "outputs_cost.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{record['cpu']}, {record['cores']} cores, commit {commit}\n{table(results)}")


if __name__ == "__main__":
    main()
