"""A night as it runs, for the dashboard: each job's stage and step, the elapsed time and an estimate of
the end, and the memory timeline with the stage rows that were in force marked on it.

Everything here is computed from what the run log holds (`RunLog.run`, `.progress`, `.timeline`), as
plain dicts, so the server only reads and the page only draws.

The estimate: each job's remaining stages cost what that stage has cost a job so far tonight (the mean
wall time of its finished rows), or, for a stage that has not finished a job yet, what its running row's
pace says (time so far over the fraction of its steps done), or else what it cost a job in the latest
earlier night (`history`); a running row's own remainder goes at its own pace. Stages without a
component (finish) run beside the later jobs' card stages, so only the longest job's remainder of them
is added after the card work. With a stage whose cost nothing tells, there is no estimate (None).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from t2v.pipeline import stages
from t2v.runlog.live import SAMPLE_FIELDS, Sample

__all__ = ["MAX_POINTS", "history", "jobs_now", "estimate", "peaks", "segments", "timeline", "view"]

MAX_POINTS = 2000
"""Timeline points the API sends at most: a longer night is sent as buckets of consecutive samples, each
with its highest figures (so a peak is never averaged away) at its first sample's time."""
_DONE = ("ok", "skipped")
_MEMORY = SAMPLE_FIELDS[1:]


def _time(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def _templates(run: dict[str, Any], progress: list[dict[str, Any]]) -> list[str]:
    """The night's jobs in order: its job specs where it kept them, then any template its rows name."""
    names: list[str] = []
    try:
        names = [job["template"] for job in json.loads(run.get("jobs_json") or "{}").get("jobs", [])]
    except (ValueError, TypeError, KeyError, AttributeError):
        names = []  # an unreadable jobs_json still leaves the rows to go by
    for row in [*run["stages"], *progress]:
        if row["template"] not in names:
            names.append(row["template"])
    return names


def _last_rows(run: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in run["stages"]:  # oldest first: each list ends with the last attempt
        rows.setdefault((row["template"], row["stage"]), []).append(row)
    return rows


def _status(row: dict[str, Any], run: dict[str, Any]) -> str:
    # A row the run outlived never finished: it was interrupted with the run (summary does the same).
    return "interrupted" if row["status"] == "running" and run["status"] != "running" else row["status"]


def jobs_now(run: dict[str, Any], progress: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each job's stage now and its step there: `state` is running, waiting (for `stage`), done, failed
    or interrupted (with the last step the run log heard of)."""
    names = [s.name for s in stages()]
    rows = _last_rows(run)
    steps = {(p["template"], p["stage"]): (p["step"], p["steps"]) for p in progress}
    out = []
    for template in _templates(run, progress):
        entry = {"template": template, "stage": names[0], "step": None, "steps": None, "state": "waiting"}
        reached = [s for s in names if (template, s) in rows or (template, s) in steps]
        if reached:
            stage = reached[-1]
            last = rows.get((template, stage), [None])[-1]
            state = _status(last, run) if last else "running"
            entry |= dict(zip(("step", "steps"), steps.get((template, stage), (None, None)), strict=True))
            entry["stage"] = stage
            later = names[names.index(stage) + 1 :]
            if state in _DONE and not later:
                state = "done"
            elif state in _DONE:  # between two stages: waiting for the next, or stopped before it
                state = "waiting" if run["status"] == "running" else "interrupted"
                entry |= {"stage": later[0], "step": None, "steps": None}
            entry["state"] = state
        out.append(entry)
    return out


def history(runs: list[dict[str, Any]], *, before: str) -> dict[str, float]:
    """Seconds a job took in each stage in the latest night started before `before` (ISO time) that
    computed it: the mean over its jobs whose stage ended ok, failed attempts' time included."""
    out: dict[str, float] = {}
    for run in sorted(runs, key=lambda r: r["started"], reverse=True):
        if run["started"] >= before or run["status"] == "running":
            continue
        for stage, walls in _stage_walls(run).items():
            out.setdefault(stage, sum(walls) / len(walls))
    return out


def _stage_walls(run: dict[str, Any]) -> dict[str, list[float]]:
    """Per stage, the wall time of each job whose stage was computed and ended ok."""
    walls: dict[str, list[float]] = {}
    for (_, stage), rows in _last_rows(run).items():
        if rows[-1]["status"] == "ok":
            walls.setdefault(stage, []).append(sum(r["wall_s"] or 0.0 for r in rows))
    return walls


def _fraction(value: tuple[int, int | None] | None) -> float | None:
    if value is None or not value[1]:
        return None
    return min(max(value[0] / value[1], 0.0), 1.0)


def estimate(
    run: dict[str, Any], progress: list[dict[str, Any]], known: dict[str, float], now: datetime
) -> dict[str, Any]:
    """The night's elapsed seconds and, while it runs, the seconds left and the time it should end."""
    started = _time(run["started"]) or now
    finished = _time(run["finished"])
    elapsed = ((finished or now) - started).total_seconds()
    if run["status"] != "running":
        return {"elapsed_s": elapsed, "remaining_s": None, "ends_at": None}
    pipeline = stages()
    rows = _last_rows(run)
    steps = {(p["template"], p["stage"]): (p["step"], p["steps"]) for p in progress}
    cost = {s: sum(w) / len(w) for s, w in _stage_walls(run).items()}
    for stage in pipeline:
        paces = [
            (now - _time(last[-1]["started"])).total_seconds() / f
            for (template, name), last in rows.items()
            if name == stage.name
            and last[-1]["status"] == "running"
            and (f := _fraction(steps.get((template, name))))
        ]
        if stage.name not in cost and paces:
            cost[stage.name] = sum(paces) / len(paces)
        if stage.name not in cost and stage.name in known:
            cost[stage.name] = known[stage.name]
    card, beside, unknown = 0.0, [0.0], False
    for template in _templates(run, progress):
        if any(r[-1]["status"] == "failed" for (t, _), r in rows.items() if t == template):
            continue  # a failed job's later stages never run
        off_card = 0.0
        for stage in pipeline:
            last = rows.get((template, stage.name), [None])[-1]
            if last is not None and last["status"] in _DONE:
                continue
            left: float | None = cost.get(stage.name)
            if last is not None and last["status"] == "running":
                so_far = (now - _time(last["started"])).total_seconds()
                fraction = _fraction(steps.get((template, stage.name)))
                if fraction:
                    left = so_far * (1 - fraction) / fraction  # its own pace
                elif left is not None:
                    left = max(left - so_far, 0.0)
            if left is None:
                unknown = True
            elif stage.on_card:
                card += left
            else:
                off_card += left
        beside.append(off_card)
    if unknown:
        return {"elapsed_s": elapsed, "remaining_s": None, "ends_at": None}
    remaining = card + max(beside)
    return {
        "elapsed_s": elapsed,
        "remaining_s": remaining,
        "ends_at": (now + timedelta(seconds=remaining)).isoformat(),
    }


def timeline(samples: list[Sample], *, max_points: int = MAX_POINTS) -> list[dict[str, float | None]]:
    """The samples as the API sends them (`SAMPLE_FIELDS` keys, None where not measured), at most
    `max_points` of them."""
    size = max(1, math.ceil(len(samples) / max_points))
    points = []
    for i in range(0, len(samples), size):
        bucket = samples[i : i + size]
        point: dict[str, float | None] = {"t_s": bucket[0][0]}
        for k, name in enumerate(_MEMORY, start=1):
            values = [s[k] for s in bucket if s[k] is not None]
            point[name] = max(values) if values else None
        points.append(point)
    return points


def segments(run: dict[str, Any], samples: list[Sample]) -> list[dict[str, Any]]:
    """Every computed stage attempt (skipped ones took no time) as seconds since the run started, with
    its plan: what the timeline marks. A row still open ends at the last sample."""
    started = _time(run["started"])
    if started is None:
        return []
    last = samples[-1][0] if samples else 0.0
    out = []
    for row in run["stages"]:
        if row["status"] == "skipped":
            continue
        begin = (_time(row["started"]) - started).total_seconds()
        end = (_time(row["finished"]) - started).total_seconds() if row["finished"] else max(last, begin)
        if row["finished"] and run["status"] == "interrupted" and samples:
            end = min(end, max(last, begin))  # closed by a sweep, after the night had died
        out.append(
            {
                "template": row["template"],
                "stage": row["stage"],
                "plan": row["plan"],
                "status": _status(row, run),
                "attempt": row["attempt"],
                "start_s": begin,
                "end_s": end,
            }
        )
    return sorted(out, key=lambda s: s["start_s"])


def peaks(samples: list[Sample], marked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measured figure's highest sample, with the stage attempts in force at that moment."""
    out = []
    for k, name in enumerate(_MEMORY, start=1):
        measured = [s for s in samples if s[k] is not None]
        if not measured:
            continue
        top = max(measured, key=lambda s: s[k])
        during = [
            {"template": m["template"], "stage": m["stage"], "plan": m["plan"]}
            for m in marked
            if m["start_s"] <= top[0] <= m["end_s"]
        ]
        out.append({"field": name, "gib": top[k], "t_s": top[0], "during": during})
    return out


def view(
    run: dict[str, Any],
    progress: list[dict[str, Any]],
    *,
    known: dict[str, float] | None = None,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """The live panel of a running or interrupted night: elapsed, estimate, each job's stage and step;
    None for a night that ended otherwise."""
    if run["status"] not in ("running", "interrupted"):
        return None
    now = now or datetime.now(UTC)
    heard = _time(run.get("heartbeat"))
    return estimate(run, progress, known or {}, now) | {
        "jobs": jobs_now(run, progress),
        "heartbeat_age_s": (now - heard).total_seconds() if heard else None,
    }
