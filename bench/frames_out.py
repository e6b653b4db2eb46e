"""What a decoded 720P clip costs after the decoder: its conversion to uint8 frames and its lossless
write to the store (the .npy stand-in for FFV1 on a machine without ffmpeg), piece by piece.

    python bench/frames_out.py --out bench/results     # on a GPU (the device tool)

Times, on a random bf16 video of 1280x704x121 on the card: diffusers' `postprocess_video("np")` with
`t2v.stages.to_uint8` (on the host) against `t2v.stages.frames_uint8` (on the card), and the frames'
.npy write, fsync and digest in a store folder under --store. Records go to `frames_out.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t2v  # noqa: E402, F401  (its allocator settings before torch touches the card)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.video_processor import VideoProcessor  # noqa: E402

from t2v import stages  # noqa: E402
from t2v.digests import file_digest  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--store", type=Path, default=Path("/tmp/frames_out"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    video = (torch.randn(1, 3, 121, 704, 1280, generator=gen, device="cuda") * 0.6).to(torch.bfloat16)
    processor = VideoProcessor(vae_scale_factor=16)
    record: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "resolution": "1280x704x121"}
    for name, fn in [
        (
            "host_postprocess_s",
            lambda: stages.to_uint8(processor.postprocess_video(video, output_type="np")[0]),
        ),
        ("card_frames_uint8_s", lambda: stages.frames_uint8(video, processor)),
        ("card_frames_uint8_from_host_s", lambda: stages.frames_uint8(video.cpu(), processor, device="cuda")),
    ]:
        frames, record[name] = timed(fn)
    args.store.mkdir(parents=True, exist_ok=True)
    path = args.store / "frames.npy"
    start = time.perf_counter()
    with open(path, "wb") as f:
        np.save(f, frames)
    record["npy_write_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    record["fsync_s"] = time.perf_counter() - start
    start = time.perf_counter()
    file_digest(path)
    record["digest_s"] = time.perf_counter() - start
    record["bytes"] = path.stat().st_size
    path.unlink()
    print(json.dumps(record), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frames_out.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
