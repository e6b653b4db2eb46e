"""The headline figures of bench/nightly_throughput.py, from its phases' raw records (also for an
existing results file: `--summarise`)."""

from __future__ import annotations

from bench.timeline import card_labels, card_timeline, compile_seconds, label
from t2v.pipeline import CLIP, diffuse

LEGACY_BUCKETS = {"denoise": label(diffuse.STAGE)}
"""Files written before the hooks (runs 1-10) named the diffuse stage's compute after its function."""


def upgrade(ours: dict) -> dict:
    """A record from before the hooks, in today's bucket names (others as they are)."""
    for old, new in LEGACY_BUCKETS.items():
        for part in ("compute_s", "calls"):
            if old in ours.get(part, {}):
                ours[part][new] = ours[part].pop(old)
        ours["events"] = [(LEGACY_BUCKETS.get(e[0], e[0]), *e[1:]) for e in ours.get("events", [])]
    return ours


def overhead_split(ours: dict) -> dict:
    """Our wall time outside model compute, split into what the flow waited for; adds up to it:

    - compile: `torch.compile` of the repeated blocks, where the run compiles (T2V_COMPILE);
    - loads: placing each stage's component (the "place" spans: taking the prefetched host copy or
      waiting for it, moving to the card, hooking); the prefetch thread's reading and pinning ran beside
      the stages and is reported apart (`prefetch_s`);
    - <stage>_tail: the rest of each card stage's span, whose jobs run as tasks submitted together:
      what was not hidden behind another job's compute (waits for the card, run-log rows, the last
      output's write with its fsync);
    - <clip>_tail: the clips still being finished after the last card stage;
    - prefect_and_flow: the rest (Prefect's task and flow machinery, the flow's own steps, task
      start-ups, giving back the run's memory at its end)."""
    seconds = ours["compute_s"]
    compile_s = compile_seconds(ours)
    stages = card_labels()
    compute = sum(seconds.get(x, 0.0) for x in stages) - compile_s["first_steps"]
    split = {"loads": seconds.get("apply", 0.0), "compile": compile_s["total"]}
    for x in stages:
        split[f"{x}_tail"] = (
            seconds.get(f"stage_{x}", 0.0) - seconds.get(x, 0.0) - seconds.get(f"apply_{x}", 0.0)
        )
    split[f"{label(diffuse.STAGE)}_tail"] -= compile_s["call"]
    split[f"{label(CLIP)}_tail"] = seconds.get(f"{label(CLIP)}_tail", 0.0)
    split["prefect_and_flow"] = ours["wall_s"] - compute - sum(split.values())
    return {"compute": compute, "compile": compile_s, "split": split}


def summarise_ours(results: dict, ours: dict) -> None:
    """Ours: wall time minus model compute is the overhead (the computes hold the card one at a time,
    so their times add up without overlap); the compile inside the first compiled steps is overhead
    too. Peak reserved memory is the largest of the run-log rows: the runner resets PyTorch's peak
    counter at each stage, so a window around the whole flow sees only the last stage's."""
    ours = upgrade(ours)
    wall, seconds = ours["wall_s"], ours["compute_s"]
    parts = overhead_split(ours)
    results["ours_clips_per_hour"] = 3600 * ours["clips"] / wall
    results["ours_overhead_share"] = (wall - parts["compute"]) / wall
    results["ours_overhead_share_excluding_compile"] = (
        wall - parts["compute"] - parts["compile"]["total"]
    ) / wall
    results["ours_loads_share"] = seconds.get("apply", 0.0) / wall
    results["ours_overhead_s"] = parts["split"]
    results["flow_parts_s"] = {k[5:]: v for k, v in seconds.items() if k.startswith("flow_")}
    # The prefetch thread's loads, and its page-locking (in files from before the hooks, in `prefetch`).
    prefetch = seconds.get("prefetch")
    results["prefetch_s"] = prefetch + seconds.get("pinning", 0.0) if prefetch is not None else None
    results["pins"] = ours.get("pins")
    if ours.get("events"):
        results["card_timeline_s"] = card_timeline(ours["events"])
    peaks = [r["peak_reserved_gib"] for r in ours["rows"] if r.get("peak_reserved_gib") is not None]
    results["ours_peak_gib"] = max(peaks) if peaks else ours["peak_reserved_gib"]
    results["ours_peak_nvml_gib"] = ours["peak_nvml_gib"]


def summarise(results: dict) -> dict:
    """The headline figures of `results` (in place); returns it."""
    ours = results["phases"].get("ours")
    if ours:
        summarise_ours(results, ours)
    base = results["phases"].get("baseline")
    if base:
        results["baseline_clips_per_hour"] = 3600 * base["clips"] / base["wall_s"]
        results["baseline_peak_gib"] = base["peak_reserved_gib"]
        results["baseline_peak_nvml_gib"] = base["peak_nvml_gib"]
    if ours and base:
        results["ratio"] = results["ours_clips_per_hour"] / results["baseline_clips_per_hour"]
    return results
