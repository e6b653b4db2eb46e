"""Figures the dashboard and the Prefect artifact show, computed from run-log rows (plain dicts).

A stage may have several attempts in one run (an out-of-memory fallback to a leaner plan); the
figures of a (job, stage) pair add up the wall time of all of them and keep the highest peaks, and
the pair's status is that of its last attempt, so a stage that recovered is not reported as failed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from t2v.pipeline import CLIP, stages
from t2v.rerun import RERUNNABLE_KINDS


def stage_names() -> tuple[str, ...]:
    """The stages in pipeline order, as the run log names them."""
    return tuple(stage.name for stage in stages())


__all__ = ["night", "nights", "stage_table", "trends"]

_BAD = ("failed", "interrupted")


def _vram(row: dict[str, Any]) -> float | None:
    # What the caching allocator held is what decides out-of-memory; NVML also sees other
    # processes and the CUDA context, so it is only the fallback when torch's counter is missing.
    value = row.get("peak_reserved_gib")
    return value if value is not None else row.get("peak_nvml_gib")


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _seconds(started: str | None, finished: str | None) -> float | None:
    if not started:
        return None
    end = datetime.fromisoformat(finished) if finished else datetime.now(UTC)
    return (end - datetime.fromisoformat(started)).total_seconds()


def _stage_figures(rows: list[dict[str, Any]], *, run_ended: bool) -> dict[str, Any]:
    last = rows[-1]
    status = last["status"]
    if run_ended and status == "running":
        # The run was closed (interrupted) before this row was: the stage never finished.
        status = "interrupted"
    figures: dict[str, Any] = {
        "status": status,
        "plan": last["plan"],
        "attempts": len(rows),
        "wall_s": None,
        "peak_vram_gib": None,
        "peak_ram_gib": None,
        "output_key": last["output_key"],
        "error": last["error"],
    }
    for row in rows:
        if row["wall_s"] is not None:
            figures["wall_s"] = (figures["wall_s"] or 0.0) + row["wall_s"]
        figures["peak_vram_gib"] = _max(figures["peak_vram_gib"], _vram(row))
        figures["peak_ram_gib"] = _max(figures["peak_ram_gib"], row.get("peak_rss_gib"))
    return figures


def _job_status(run_status: str, stages: dict[str, dict[str, Any]]) -> str:
    final = stages.get(CLIP.name)
    if final and final["status"] in ("ok", "skipped"):
        return "ok"
    statuses = {s["status"] for s in stages.values()}
    if "failed" in statuses:
        return "failed"
    if run_status == "running":
        return "running"
    if run_status == "interrupted" or "interrupted" in statuses:
        # Stopped (kill, Ctrl+C, reboot) before its clip, with no stage of its own failing: calling
        # it failed would send someone looking for an error that does not exist.
        return "interrupted"
    return "failed"  # the run ended (failed) before this job reached its last stage


def night(run: dict[str, Any]) -> dict[str, Any]:
    """One run (as `RunLog.run` returns it) with per-job, per-stage figures, failures and clips."""
    by_job: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in run["stages"]:  # oldest first, so each list ends with the last attempt
        by_job.setdefault(row["template"], {}).setdefault(row["stage"], []).append(row)

    ended = run["status"] != "running"
    jobs = []
    failures = []
    for template, stage_rows in by_job.items():
        stages = {
            stage: _stage_figures(stage_rows[stage], run_ended=ended)
            for stage in stage_names()
            if stage in stage_rows
        }
        status = _job_status(run["status"], stages)
        for stage, figures in stages.items():
            if figures["status"] in _BAD:
                failures.append(
                    {
                        "template": template,
                        "stage": stage,
                        "status": figures["status"],
                        "attempts": figures["attempts"],
                        "error": figures["error"] or "",
                    }
                )
        final = stages.get(CLIP.name)
        clip = final["output_key"] if status == "ok" and final else None
        jobs.append({"template": template, "status": status, "clip_key": clip, "stages": stages})

    return {
        "id": run["id"],
        "kind": run["kind"],
        "status": run["status"],
        "model": run["model"],
        "catalogue": run["catalogue"],
        "parent_run_id": run["parent_run_id"],
        "host": run["host"],
        "started": run["started"],
        "finished": run["finished"],
        "wall_s": _seconds(run["started"], run["finished"]),
        "jobs_ok": sum(j["status"] == "ok" for j in jobs),
        "jobs_failed": sum(j["status"] == "failed" for j in jobs),
        "jobs_interrupted": sum(j["status"] == "interrupted" for j in jobs),
        # Every row skipped: the store held every output, so the night's chart would be all zeros.
        "nothing_computed": bool(run["stages"]) and all(r["status"] == "skipped" for r in run["stages"]),
        "jobs": jobs,
        "failures": failures,
        # What `t2v rerun` accepts: a nightly (or re-run) that ended failed or interrupted. An
        # interrupted night may have no failed row at all (killed between two stages).
        "rerun_command": (
            f"t2v rerun {run['id']}" if run["status"] in _BAD and run["kind"] in RERUNNABLE_KINDS else None
        ),
    }


def nights(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The list view: each run's headline figures without its per-job detail."""
    out = []
    for run in runs:
        summary = night(run)
        out.append({k: v for k, v in summary.items() if k not in ("jobs", "failures")})
    return out


def trends(runs: list[dict[str, Any]], *, kinds: tuple[str, ...] = ("nightly",)) -> dict[str, Any]:
    """Per stage across runs of `kinds`, oldest first: the highest peak VRAM and the summed wall time."""
    chosen = sorted((r for r in runs if r["kind"] in kinds), key=lambda r: r["started"])
    names = stage_names()
    out: dict[str, Any] = {
        "runs": [r["id"] for r in chosen],
        # Two runs can start in the same minute (a rerun, a test); the id prefix tells them apart.
        "labels": [f"{r['started'][5:16].replace('T', ' ')} {r['id'][:6]}" for r in chosen],
        "peak_vram_gib": {stage: [] for stage in names},
        "wall_s": {stage: [] for stage in names},
        "peak_ram_gib": [],
    }
    for run in chosen:
        vram: dict[str, float | None] = dict.fromkeys(names)
        wall: dict[str, float | None] = dict.fromkeys(names)
        ram: float | None = None
        for row in run["stages"]:
            stage = row["stage"]
            vram[stage] = _max(vram[stage], _vram(row))
            if row["wall_s"] is not None:
                wall[stage] = (wall[stage] or 0.0) + row["wall_s"]
            ram = _max(ram, row.get("peak_rss_gib"))
        for stage in names:
            out["peak_vram_gib"][stage].append(vram[stage])
            out["wall_s"][stage].append(wall[stage])
        out["peak_ram_gib"].append(ram)
    return out


def stage_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """A flat row per (job, stage), rounded for reading: what the nightly flow's Prefect artifact shows."""

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    rows = []
    for job in night(run)["jobs"]:
        for stage, f in job["stages"].items():
            rows.append(
                {
                    "template": job["template"],
                    "stage": stage,
                    "status": f["status"],
                    "plan": f["plan"] or "-",
                    "attempts": f["attempts"],
                    "wall_s": rounded(f["wall_s"], 3),
                    "peak_vram_gib": rounded(f["peak_vram_gib"], 3),
                    "peak_ram_gib": rounded(f["peak_ram_gib"], 3),
                    "error": (f["error"] or "").splitlines()[0][:200] if f["status"] in _BAD else "",
                }
            )
    return rows
