"""Step caches: a job's denoising reuses the transformer blocks' work of an earlier step instead of
running them, through diffusers' cache hooks. Lossy (the clip changes), so opt-in per template, and the
job's `step_cache` value is part of its diffuse store key.

`JobSpec.step_cache` chooses one:
- `0` (the default): off.
- a number up to 1: diffusers' FirstBlockCache at that threshold. It runs the first block every step
  and reuses the other blocks' last residual while the first block's output barely moved: the choice
  is measured at run time, so it needs no calibration, and always pays for one block.
- `"mag"` or `"mag:THRESHOLD"`: diffusers' MagCache with the magnitude ratios its authors calibrated
  for Wan2.2 TI2V-5B (below). A skipped step runs no block at all; which steps are skipped follows
  from the ratios and the step count alone (`skipped_steps`), not from the activations, so it is the
  same on every prompt, seed and card, and on the tiny model, whose own ratios these are not.

No torch or diffusers at import: `t2v.jobs`, and with it `t2v --help`, import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import MagCacheConfig

MAG = "mag"
RULE = (
    "must be 0 (off), a first-block cache threshold up to 1, or 'mag' / 'mag:THRESHOLD' "
    "(MagCache; THRESHOLD above 0, up to 1)"
)
HELP = (
    "Step cache, off by default; faster, but the clip changes. A number up to 1: diffusers' first-block "
    "cache at that threshold. mag (or mag:THRESHOLD, default 0.06): MagCache with its authors' "
    "Wan2.2 TI2V-5B ratios, 50 steps about 2x faster."
)

# Magnitude ratios published by MagCache's authors (Zehong Ma et al., "MagCache: Fast Video Generation
# with Magnitude-Aware Cache", arXiv:2506.09045) for Wan2.2 TI2V-5B, copied verbatim from
# github.com/Zehong-Ma/MagCache, MagCache4Wan2.2/magcache_generate.py at commit
# df81cb181776c2c61477c08e1d21f87fda1cd938 (lines 736 and 738; added in afe8fb18, 2025-08-07): the mean
# over tokens of |residual_t| / |residual_t-1| (residual: the blocks' output minus their input) for
# steps 2..50 of a 50-step run, cond and uncond interleaved as the authors' model forward sees them.
# These numbers are part of what "mag" means to the store key: recalibrated ones need a new name
# (e.g. "mag2"), else stored latents would be taken for the new ones' output.
# fmt: off
TI2V_5B_T2V = (
    0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468,
    0.9946, 0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398,
    0.99403, 0.99397, 0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303,
    0.99301, 0.99217, 0.99216, 0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911,
    0.99155, 0.99155, 0.98958, 0.98957, 0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883,
    0.98828, 0.98711, 0.98709, 0.98562, 0.98561, 0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282,
    0.98104, 0.98101, 0.97981, 0.97979, 0.97849, 0.97849, 0.97557, 0.97554, 0.97398, 0.97395, 0.97171,
    0.97166, 0.96917, 0.96913, 0.96511, 0.96507, 0.96263, 0.96257, 0.95839, 0.95835, 0.95483, 0.95475,
    0.94942, 0.94936, 0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872, 0.96949, 0.97015,
)
"""Text to video: cond, uncond for steps 2..50."""
TI2V_5B_I2V = (
    0.99512, 0.99559, 0.99559, 0.99561, 0.99595, 0.99577, 0.99512, 0.99512, 0.99546, 0.99534, 0.99543,
    0.99531, 0.99496, 0.99491, 0.99504, 0.99499, 0.99444, 0.99449, 0.99481, 0.99481, 0.99435, 0.99435,
    0.9943, 0.99431, 0.99411, 0.99406, 0.99373, 0.99376, 0.99413, 0.99405, 0.99363, 0.99359, 0.99335,
    0.99331, 0.99244, 0.99243, 0.99229, 0.99229, 0.99239, 0.99236, 0.99163, 0.9916, 0.99149, 0.99151,
    0.99191, 0.99192, 0.9898, 0.98981, 0.9899, 0.98987, 0.98849, 0.98849, 0.98846, 0.98846, 0.98861,
    0.98861, 0.9874, 0.98738, 0.98588, 0.98589, 0.98539, 0.98534, 0.98444, 0.98439, 0.9831, 0.98309,
    0.98119, 0.98118, 0.98001, 0.98, 0.97862, 0.97859, 0.97555, 0.97558, 0.97392, 0.97388, 0.97152,
    0.97145, 0.96871, 0.9687, 0.96435, 0.96434, 0.96129, 0.96127, 0.95639, 0.95638, 0.95176, 0.95175,
    0.94446, 0.94452, 0.93972, 0.93974, 0.93575, 0.9359, 0.93537, 0.93552, 0.96655, 0.96616,
)
"""Image to video (the first frame from a picture): cond, uncond for steps 2..50."""
# fmt: on


@dataclass(frozen=True)
class MagCache:
    """The MagCache a `"mag"` setting asks for; the defaults are the authors' TI2V-5B setting
    "E006K2R02" (MagCache4Wan2.2/README.md: 10 min 39 s to 5 min 24 s at 720P on an L20)."""

    threshold: float = 0.06
    """Skip while the accumulated error estimate, the sum of |1 - product of ratios since the last
    computed step|, stays at or below this."""
    max_skip_steps: int = 2
    """At most this many steps in a row reuse the cached residual (the authors' K)."""
    retention_ratio: float = 0.2
    """The first 20% of the steps, which shape the clip's layout, are always computed."""


@dataclass(frozen=True)
class FirstBlock:
    """diffusers' FirstBlockCache at `threshold`."""

    threshold: float


def parse(setting: object) -> FirstBlock | MagCache | None:
    """The cache a `step_cache` value asks for, None when off; ValueError for what is none of them."""
    if isinstance(setting, bool):  # a bool is an int to Python, and never meant as a threshold
        raise ValueError(setting)
    if isinstance(setting, int | float):
        if not 0 <= setting <= 1:  # NaN fails both comparisons
            raise ValueError(setting)
        return FirstBlock(float(setting)) if setting > 0 else None
    if setting == MAG:
        return MagCache()
    if isinstance(setting, str) and setting.startswith(MAG + ":"):
        threshold = float(setting[len(MAG) + 1 :])
        if not 0 < threshold <= 1:
            raise ValueError(setting)
        return MagCache(threshold=threshold)
    raise ValueError(setting)


def valid(setting: object) -> bool:
    """Whether `setting` is a `step_cache` value (`RULE`)."""
    try:
        parse(setting)
    except ValueError:
        return False
    return True


def enabled(setting: object) -> bool:
    """Whether a (valid) `step_cache` value turns a cache on."""
    return parse(setting) is not None


def from_text(text: str) -> float | str:
    """A `--step-cache` argument as the field holds it: a number as a float, anything else as given
    (for `JobSpec.validate` to judge)."""
    try:
        return float(text)
    except ValueError:
        return text


def mag_ratios(*, image: bool) -> list[float]:
    """One ratio per step of a 50-step run, the first 1.0 (it has no step before it), as diffusers'
    `MagCacheConfig` takes them; the picture (i2v) array for an image job, else the text (t2v) one.

    diffusers keeps one array for every cache context, where the authors keep one per pass: each step's
    ratio is the mean of its cond and uncond ones, which is what a calibration of the batched CFG pass
    ("cfg-batch") measures. The two differ by at most 0.0013; at the default threshold every step count
    from 1 to 200 skips the same steps with either (tests/test_step_cache.py)."""
    published = TI2V_5B_I2V if image else TI2V_5B_T2V
    cond, uncond = published[0::2], published[1::2]
    return [1.0] + [(c + u) / 2 for c, u in zip(cond, uncond, strict=True)]


def config(setting: object, *, steps: int, image: bool) -> Any:
    """diffusers' cache config for a job's `step_cache`, or None when it is off. MagCache needs the
    job's step count: diffusers interpolates the 50-step ratios to it (nearest neighbour, as the authors
    do) and restarts its step counter after that many forwards of a context."""
    cache = parse(setting)
    if cache is None:
        return None
    if isinstance(cache, FirstBlock):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=cache.threshold)
    if steps < 1:
        raise ValueError(f"MagCache needs the job's number of steps but got {steps}")
    from diffusers import MagCacheConfig

    return MagCacheConfig(
        threshold=cache.threshold,
        max_skip_steps=cache.max_skip_steps,
        retention_ratio=cache.retention_ratio,
        num_inference_steps=steps,
        mag_ratios=mag_ratios(image=image),
    )


def skipped_steps(config: MagCacheConfig) -> list[int]:
    """The steps diffusers' MagCache skips under `config`, in every cache context (cond, uncond, the
    batched pair): its head hook's rule (diffusers/hooks/mag_cache.py), on the same float32 ratios, so
    a benchmark or a test can say beforehand how many transformer passes a run saves."""
    retention = int(config.retention_ratio * config.num_inference_steps + 0.5)
    ratio, run, err, skipped = 1.0, 0, 0.0, []
    for step in range(config.num_inference_steps):
        if step < retention:
            continue
        ratio = ratio * (config.mag_ratios[step] if step < len(config.mag_ratios) else 1.0)
        run, err = run + 1, err + abs(1.0 - ratio)
        # Step 0 is always computed (retention or not), so a residual is cached from then on.
        if step > 0 and err <= config.threshold and run <= config.max_skip_steps:
            skipped.append(step)
        else:
            ratio, run, err = 1.0, 0, 0.0
    return skipped
