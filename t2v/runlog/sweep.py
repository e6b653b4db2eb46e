"""Closing rows left "running" by processes that died (`RunLog.mark_interrupted`).

On this host a row's pid says whether its process lives. A night on another host (a shared PostgreSQL
run log) has a pid that means nothing here, but a night recorded live writes `runs.heartbeat` about once
a second (t2v.engine.live): one silent for `HEARTBEAT_LOST_S` is taken for dead. Runs without a
heartbeat (older releases, a run not recorded live) are judged by their pid alone, as before.
"""

from datetime import datetime, timedelta

import psutil
from sqlalchemy import func, literal, select, update
from sqlalchemy.orm import Session

from t2v.runlog.schema import Run, StageRun, utcnow

# Slack between a process's creation time and the row it wrote; a process created later than
# this after the row cannot have written it, so the pid was recycled.
_PID_REUSE_SLACK_S = 1.0

HEARTBEAT_LOST_S = 120.0
"""How long a run on another host may go without a heartbeat before it is taken for dead: two minutes
of a recorder that writes every second is past any lock wait (SQLite's busy timeout is 30 s) and any
clock difference NTP leaves between hosts."""


def close_dead_rows(session: Session, host: str) -> int:
    """Mark "interrupted" the running rows of `host` whose process is gone, and those of runs of other
    hosts whose heartbeat stopped `HEARTBEAT_LOST_S` ago; returns the stage rows changed.

    Pids are checked for rows of `host` only: the pids of other hosts mean nothing here.
    """
    stage_rows = session.execute(
        select(StageRun.id, StageRun.pid, StageRun.started)
        .join(Run, Run.id == StageRun.run_id)
        .where(StageRun.status == "running", Run.host == host)
    ).all()
    run_rows = session.execute(
        select(Run.id, Run.pid, Run.started).where(Run.status == "running", Run.host == host)
    ).all()
    dead_stages = [r.id for r in stage_rows if not _pid_alive(r.pid, r.started)]
    dead_runs = [r.id for r in run_rows if not _pid_alive(r.pid, r.started)]
    now = utcnow()
    silent = session.scalars(
        select(Run.id).where(
            Run.status == "running",
            Run.host != host,
            Run.heartbeat.is_not(None),
            Run.heartbeat < now - timedelta(seconds=HEARTBEAT_LOST_S),
        )
    ).all()
    if silent:
        dead_runs += silent
        dead_stages += session.scalars(
            select(StageRun.id).where(StageRun.run_id.in_(silent), StageRun.status == "running")
        ).all()
    changed = 0
    if dead_stages:
        result = session.execute(
            update(StageRun)
            .where(StageRun.id.in_(dead_stages), StageRun.status == "running")
            .values(status="interrupted", finished=now)
        )
        changed = result.rowcount
    if dead_runs:
        # A run recorded live ended at its last heartbeat (its wall time stops where it died); one
        # without a heartbeat at this sweep, as before.
        session.execute(
            update(Run)
            .where(Run.id.in_(dead_runs), Run.status == "running")
            .values(
                status="interrupted", finished=func.coalesce(Run.heartbeat, literal(now, Run.heartbeat.type))
            )
        )
    return changed


def _pid_alive(pid: int, since: datetime) -> bool:
    """Whether the process that wrote a row at `since` with this pid still runs."""
    if not psutil.pid_exists(pid):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= since.timestamp() + _PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        # Access denied and the like: the process exists and we cannot prove it is a new one,
        # and marking a live stage interrupted is worse than leaving a dead one "running".
        return True
