"""Conditioning: an image job's first frame, its picture fitted to the clip and encoded by the VAE's
encoder, stored under its own key (`CONDITIONS`) for the diffuse stage to blend in.

Part of the diffuse stage, not a stage of its own. A `condition` stage between encode and diffuse is
where DESIGN.md puts it, but every text-only night would then list a stage it never runs: the stage
list that the flows, the run log's rows, the drills' error messages and a dozen tests enumerate would
change for every night, image or not. Here the diffuse stage keeps the VAE's encoder for its run
(`FirstFrames`, its `Stage.state`): loaded once per night, the first time a first frame is not in the
store, its decoder half dropped at once; on the card only while it encodes. Text-only jobs never touch
it, and their keys are those they had. See docs/architecture.md, "Image-conditioned templates".
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from t2v import images, stages
from t2v.digests import Verdict
from t2v.errors import NonFiniteOutput
from t2v.jobs import JobSpec
from t2v.pipeline.stage import KeyInputs, Work
from t2v.store import Folder, make_key

CONDITIONS = Folder(folder="conditions", suffix=".safetensors")
"""First-frame latents, by `key`: shared by every job with the same picture, size, fit and model."""

ENCODER_DTYPE = torch.float32
"""The pipeline encodes in the VAE's dtype, fp32 as published; so does this, to match it."""


def key(k: KeyInputs) -> str | None:
    """The store key of the job's first-frame latent (None for a text-only job): the picture's bytes,
    not its path (the same file moved keeps its clips, an edited one does not), and the resize."""
    job = k.job
    if job.image is None:
        return None
    return make_key(
        CONDITIONS.folder,
        model=k.model.identity,
        image=picture_digest(job.image),
        height=job.height,
        width=job.width,
        fit=job.fit,
    )


def picture_digest(path: str | Path) -> str:
    """SHA-256 of the file, read once per version of it (path, size and mtime) in this process."""
    stat = os.stat(path)
    return _digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encoder_bytes() -> int:
    """Bytes of the Wan2.2 VAE's encoder half in `ENCODER_DTYPE` (all TI2V-5B builds share it)."""
    return _encoder_params() * torch.finfo(ENCODER_DTYPE).bits // 8


@functools.cache
def _encoder_params() -> int:
    from diffusers import AutoencoderKLWan

    from t2v.models.wan22 import FULL_SIZE

    with torch.device("meta"):
        vae = AutoencoderKLWan(**FULL_SIZE["vae"]["kwargs"])
    return sum(p.numel() for p in (*vae.encoder.parameters(), *vae.quant_conv.parameters()))


ENCODE_BYTES_PER_PIXEL = 3_000
"""Card memory of encoding one frame, per pixel of it, besides the encoder's weights (0.56 GiB):
measured with the full-size VAE in fp32 on an H200 (`bench/image_to_video.py --encode-only`,
bench/results/first_frame_encode.json): 2.19 GiB at 1280x704, 0.97 GiB at 832x480, 2,610 bytes a
pixel at both; 15% margin."""


def encode_bytes(job: JobSpec) -> int:
    """What the diffuse stage's attempt needs on the card to encode the job's first frame (0: none)."""
    if job.image is None:
        return 0
    return encoder_bytes() + ENCODE_BYTES_PER_PIXEL * job.height * job.width


class FirstFrames:
    """What the diffuse stage keeps for one run: the VAE's encoder half, on the host between jobs.

    Used inside the stage's compute, which holds the card: one job at a time."""

    def __init__(self) -> None:
        self._encoder: torch.nn.Module | None = None

    def latent(self, work: Work) -> torch.Tensor:
        """The job's first-frame latent from the store, else encoded now and stored."""
        store, job = work.run.store, work.job
        at = key(KeyInputs(job, work.run.model))
        if store.check(CONDITIONS, at)[0] is Verdict.OK:
            return store.load_tensors(CONDITIONS, at)["latent"]
        picture = images.fit_picture(images.read_picture(job.image), job.width, job.height, job.fit)
        encoder = self._loaded(work)
        try:
            latent = stages.encode_first_frame(encoder.to(work.device), picture, device=work.device).cpu()
        finally:
            encoder.to("cpu")  # the card is the transformer's for the rest of the stage
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if not torch.isfinite(latent).all():
            raise NonFiniteOutput(f"{job.template}: the first frame's latent holds NaN or infinite values")
        store.save_tensors(CONDITIONS, at, {"latent": latent})
        return latent

    def _loaded(self, work: Work) -> torch.nn.Module:
        if self._encoder is None:
            with work.run.hooks.span("load", work.stage, work.job, work.plan):
                vae = work.run.hooks.load(work.run.model, "vae")
            vae.decoder = None  # the decode stage loads its own; only the encoder half stays here
            self._encoder = (vae if vae.dtype == ENCODER_DTYPE else vae.to(ENCODER_DTYPE)).eval()
        return self._encoder
