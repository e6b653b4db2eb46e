"""Facts of the Wan2.2 TI2V-5B architecture that hold for every model t2v runs (tiny included)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from t2v.samplers import Preset

FULL_SIZE: dict = json.loads(resources.files("t2v.models").joinpath("wan22_ti2v_5b.json").read_text())
"""The public full-size architecture (a copy of shared/wan22_ti2v_5b.json): no weights, only shapes."""

MAX_SEQUENCE_LENGTH: int = FULL_SIZE["text_encoder"]["max_sequence_length"]

DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, jpeg artifacts, watermark, text, static, still frame, worst quality, "
    "deformed, disfigured, extra fingers, messy background"
)


@dataclass(frozen=True)
class ModelRules:
    """Input rules a job must meet for a model, and the sampler it implies; checked before any weights
    load."""

    spatial_multiple: int = 32
    """VAE spatial factor (16) times the transformer's patch (2)."""
    temporal_factor: int = 4
    """Frames must be `temporal_factor * k + 1`."""
    max_side: int = 1280
    """Largest height or width accepted (the 720P class: 1280x704 or 704x1280)."""
    max_frames: int = 121
    """Five seconds at 24 fps, the length the model was trained for."""
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    """Tokens of the prompt that reach the text encoder; longer prompts are rejected."""
    preset: Preset | None = None
    """The sampler a job that names none gets (`t2v.samplers.resolve`): a few-step checkpoint's folder
    implies one (FastWan2.2's `WanDMDPipeline`); None: the folder's own scheduler."""


WAN22_RULES = ModelRules()
