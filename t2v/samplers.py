"""Samplers (issue 18, item 3): how a job's latents go from its seed's noise to clean latents.

A job's `sampler` names one, or leaves it to the model (`None`, the default: the folder's preset if
it has one, else "model"):

- **model**: the folder's own scheduler (UniPC with flow sigmas for Wan2.2) over `steps` steps, with
  classifier-free guidance: what t2v always did, and what every job that names no sampler on a plain
  Wan2.2 folder still does, under the same store keys.
- **euler**: deterministic flow-matching Euler steps at explicit `timesteps` (sigma = t / 1000, the
  last step down to 0), with guidance: a few-step schedule of one's own on any checkpoint.
- **dmd**: the sampler of DMD-distilled few-step checkpoints (FastWan2.2-TI2V-5B, Wan2.2-TI2V-5B-Turbo),
  no guidance. At each explicit timestep the transformer's flow velocity v gives the clean latents,
  x0 = x_t - sigma_t v; they are re-noised with fresh noise to the next timestep,
  x = (1 - sigma_next) x0 + sigma_next noise, and the last step's x0 is the result.

What the dmd definition follows (read in hao-ai-lab/FastVideo, commit 2f3d407):
`fastvideo/pipelines/stages/denoising.py` `DmdDenoisingStage` feeds the raw timesteps (1000, 757, 522)
to the transformer and takes sigma_t from a `FlowMatchEulerDiscreteScheduler(shift=8.0)`'s 1000-entry
training table at the entry nearest t (`fastvideo/models/utils.py` `pred_noise_to_pred_video`, the
scheduler's `add_noise`); `fastvideo/configs/pipelines/wan.py` `FastWan2_2_TI2V_5B_Config` gives the
timesteps (and flow_shift 5.0, which the DMD stage does not use), `fastvideo/registry.py` ties it to
FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers, whose model_index.json names `WanDMDPipeline`
(`fastvideo/pipelines/basic/wan/wan_dmd_pipeline.py`). quanhaol/Wan2.2-TI2V-5B-Turbo samples the same
way (`pipeline/wan22_fewstep_inference.py`; its `utils/wan_wrapper.py` table has shift 8.0 too) at
1000, 750, 500, 250. On that table sigma is t / 1000 to within 0.0004 (757 -> 0.75676, 522 -> 0.52174).

The fresh noise of step i is drawn from a seed derived from the job's seed and i (`dmd_noise`), not
from one generator carried along: so the same seed gives the same clip, and a diffusion resumed after
step i (t2v.checkpoints) draws exactly the noise an uninterrupted one would. FastVideo draws its
noise in another layout from its own generator, so clips are not FastVideo's to the bit.

Each sampler but "model" is a scheduler-like object (`set_timesteps`, `set_begin_index`, `timesteps`,
`step`) that `t2v.stages.denoise` drives exactly as it drives diffusers' schedulers, so the first-frame
condition of an image job, the plans' switches and checkpoints work the same with all three.
Nothing here imports torch at import time: `t2v.jobs` imports this module, and `t2v --help` imports it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from t2v import step_caches
from t2v.errors import InvalidInput

if TYPE_CHECKING:
    import torch

MAX_TIMESTEP = 1000
"""Wan2.2's training timesteps run from 0 (clean) to 1000 (pure noise)."""

DMD_SIGMA_SHIFT = 8.0
"""The shift of the flow-matching table dmd reads sigma_t from (FastVideo's `DmdDenoisingStage`)."""


@dataclass(frozen=True)
class Kind:
    """What a sampler takes."""

    name: str
    timesteps: bool
    """Runs at explicit `timesteps` (required), rather than the model scheduler's `steps`."""
    guidance: bool
    """Takes classifier-free guidance; without it `guidance` must be <= 1 (off)."""


KINDS = {
    "model": Kind("model", timesteps=False, guidance=True),
    "euler": Kind("euler", timesteps=True, guidance=True),
    "dmd": Kind("dmd", timesteps=True, guidance=False),
}


@dataclass(frozen=True)
class Preset:
    """The sampler a model folder implies, for jobs that name none."""

    name: str
    sampler: str
    timesteps: tuple[int, ...]


FASTWAN = Preset("FastWan2.2-TI2V-5B", "dmd", (1000, 757, 522))
"""FastVideo's DMD distillation (Apache-2.0): 3 steps, no guidance."""

PIPELINE_PRESETS = {"WanDMDPipeline": FASTWAN}
"""Presets by a folder's model_index.json `_class_name`: pipeline classes diffusers does not have, whose
folders hold Wan2.2 TI2V components in diffusers' layout (FastVideo saves FastWan2.2 so)."""

TURBO_TIMESTEPS = (1000, 750, 500, 250)
"""Wan2.2-TI2V-5B-Turbo's schedule (its configs/inference/wan22.yaml). Its weights come in Wan's own
layout, so no folder names a pipeline for it: a template asks for dmd at these (README). Licence:
CC BY-NC-SA 4.0, non-commercial."""


# --- what a job asks for -------------------------------------------------------------------------


def coerce_timesteps(value: object) -> object:
    """A job's `timesteps` as the catalogue (a list), the CLI ("1000,757,522") or a re-run's JSON (a
    list) give them, as a tuple of numbers; what cannot be read is left as given for `check` to name."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
        try:
            return tuple(int(p) if p.lstrip("-").isdigit() else float(p) for p in parts)
        except ValueError:
            return value
    if isinstance(value, list):
        return tuple(value)
    return value


def resolve(job: Any, rules: Any, *, guidance_given: bool = False) -> Any:
    """`job` with the model's preset applied where it names no sampler (its sampler, and its timesteps
    unless the job has its own), and guidance turned off for a sampler without it, unless the template
    or the command line set `guidance` itself (`guidance_given`: then `check` refuses it). A job that
    needs neither is returned as it is, so a plain job keeps its value and its keys."""
    changes: dict[str, object] = {}
    preset = getattr(rules, "preset", None)
    sampler = job.sampler
    if sampler is None and preset is not None:
        sampler = changes["sampler"] = preset.sampler
        if not job.timesteps:
            changes["timesteps"] = preset.timesteps
    kind = KINDS.get(sampler) if isinstance(sampler, str) else None
    guidance = job.guidance
    if kind is not None and not kind.guidance and not guidance_given and _number(guidance) and guidance > 1:
        changes["guidance"] = 1.0
    return replace(job, **changes) if changes else job


def check(job: Any, rules: Any) -> None:
    """Raise InvalidInput naming `sampler`, `timesteps` or `guidance` unless they go together. A job
    that names no sampler is judged as the model's preset would make it."""
    if job.sampler is None and getattr(rules, "preset", None) is not None:
        job = resolve(job, rules)
    sampler, timesteps = job.sampler, job.timesteps
    if sampler is not None and (not isinstance(sampler, str) or sampler not in KINDS):
        _bad("sampler", sampler, f"must be one of {', '.join(KINDS)} (or unset: the model's own)")
    kind = KINDS[sampler or "model"]
    if not isinstance(timesteps, tuple) or not all(_number(t) for t in timesteps):
        _bad("timesteps", timesteps, "must be a list of numbers such as [1000, 757, 522]")
    shown = list(timesteps)
    if not all(math.isfinite(t) and 0 <= t <= MAX_TIMESTEP for t in timesteps):
        _bad("timesteps", shown, f"must each lie between 0 and {MAX_TIMESTEP}")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:], strict=False)):
        _bad("timesteps", shown, f"must be strictly decreasing (noise, at {MAX_TIMESTEP}, first)")
    if timesteps and not kind.timesteps:
        _bad("timesteps", shown, "go with sampler euler or dmd (the model's scheduler takes `steps`)")
    if kind.timesteps and not timesteps:
        _bad("sampler", sampler, "needs `timesteps` (e.g. [1000, 757, 522])")
    if not kind.guidance and _number(job.guidance) and job.guidance > 1:
        _bad(
            "guidance",
            job.guidance,
            f"must be 1 or less (off) with sampler {kind.name} (it has no classifier-free guidance)",
        )
    if kind.timesteps and step_caches.valid(job.step_cache):
        # MagCache's ratios were measured on the model's scheduler at 50 steps with guidance: on a few
        # explicit timesteps they skip steps at random.
        if isinstance(step_caches.parse(job.step_cache), step_caches.MagCache):
            rule = f"must not be MagCache with sampler {kind.name} (its ratios are the model scheduler's)"
            _bad("step_cache", job.step_cache, rule)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bad(name: str, value: object, rule: str) -> None:
    raise InvalidInput(f"`{name}` {rule} but is {value!r}.")


# --- in a run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """A resolved job's sampler: its kind and timesteps."""

    name: str
    timesteps: tuple[float, ...] = ()

    @classmethod
    def of(cls, job: Any) -> Sampler:
        """The sampler of a job `resolve` has seen (its `sampler` None: the model's scheduler)."""
        return cls(name=job.sampler or "model", timesteps=tuple(float(t) for t in job.timesteps))

    @property
    def kind(self) -> Kind:
        return KINDS[self.name]

    def key_part(self) -> dict[str, object] | None:
        """What it adds to the diffuse key: nothing for the model's scheduler (keys as they were)."""
        if self.name == "model":
            return None
        part: dict[str, object] = dict(name=self.name, timesteps=list(self.timesteps))
        if self.name == "dmd":  # the table sigma_t is read from, and how the fresh noise is drawn
            part.update(sigma_shift=DMD_SIGMA_SHIFT, noise="sha256(seed/step)")
        return part

    def scheduler(self, *, seed: int) -> Any | None:
        """The scheduler-like object `stages.denoise` drives; None: use the model's own."""
        if self.name == "euler":
            return EulerSampler(self.timesteps)
        if self.name == "dmd":
            return DMDSampler(self.timesteps, seed=seed)
        return None


class _ExplicitTimesteps:
    """The part euler and dmd share: timesteps given, a step index, diffusers' scheduler interface.

    Every attribute is a tensor or a scalar, so `t2v.checkpoints.scheduler_state` saves it whole and a
    resumed diffusion continues at the right step."""

    def __init__(self, timesteps: tuple[float, ...]) -> None:
        import torch

        self.given = torch.tensor(timesteps, dtype=torch.float32)
        self.timesteps = self.given.clone()
        self.sigmas = self._sigmas(self.given)
        self._step_index = 0

    @staticmethod
    def _sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        if num_inference_steps != len(self.given):
            raise ValueError(f"{len(self.given)} timesteps given, but {num_inference_steps} steps asked for")
        self.timesteps = self.given.to(device)
        self._step_index = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._step_index = begin_index

    def step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = False
    ) -> tuple[torch.Tensor]:
        i = self._step_index
        # Latents stay in their own dtype (fp32), as diffusers' schedulers keep them.
        velocity = model_output.to(sample.dtype)
        out = self._step(i, velocity, sample)
        self._step_index = i + 1
        return (out,)

    def _step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerSampler(_ExplicitTimesteps):
    """Flow-matching Euler: x <- x + (sigma_next - sigma) v, sigma = t / 1000, down to 0 after the last."""

    @staticmethod
    def _sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([timesteps.double() / MAX_TIMESTEP, torch.zeros(1, dtype=torch.float64)])

    def _step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        return sample + (sigma_next - sigma) * velocity


class DMDSampler(_ExplicitTimesteps):
    """DMD: x0 = x - sigma v, then x = (1 - sigma_next) x0 + sigma_next fresh noise; the last x0 is the
    result."""

    def __init__(self, timesteps: tuple[float, ...], *, seed: int) -> None:
        super().__init__(timesteps)
        self.seed = seed

    @staticmethod
    def _sigmas(timesteps: torch.Tensor) -> torch.Tensor:
        return dmd_sigmas(timesteps)

    def _step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        clean = sample - float(self.sigmas[i]) * velocity
        if i + 1 == len(self.sigmas):
            return clean
        sigma_next = float(self.sigmas[i + 1])
        noise = dmd_noise(self.seed, i + 1, tuple(sample.shape), device=sample.device)
        return (1 - sigma_next) * clean + sigma_next * noise.to(sample.dtype)


def dmd_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
    """sigma_t of each timestep: the entry nearest t of the shift-8 flow-matching training table,
    sigma(u) = 8u / (1 + 7u) for u = 1/1000 ... 1 (FastVideo's lookup, in its float32)."""
    import torch

    u = torch.arange(1, MAX_TIMESTEP + 1, dtype=torch.float32) / MAX_TIMESTEP
    table = DMD_SIGMA_SHIFT * u / (1 + (DMD_SIGMA_SHIFT - 1) * u)
    nearest = (table.double()[None, :] * MAX_TIMESTEP - timesteps.double()[:, None]).abs().argmin(dim=1)
    return table[nearest].double()


def dmd_noise(seed: int, step: int, shape: tuple[int, ...], *, device: torch.device | str) -> torch.Tensor:
    """The fresh noise dmd draws before step `step` (1, 2, ...): from a seed of its own, derived from
    the job's seed and the step, drawn on the CPU as the job's starting noise is."""
    from t2v.stages import initial_noise

    digest = hashlib.sha256(f"t2v/dmd-noise/{seed}/{step}".encode()).digest()
    return initial_noise(shape, seed=int.from_bytes(digest[:8], "big") >> 1, device=device)
