"""Closing rows left "running" by processes that died (`RunLog.mark_interrupted`)."""

from datetime import datetime

import psutil
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from t2v.runlog.schema import Run, StageRun, utcnow

# Slack between a process's creation time and the row it wrote; a process created later than
# this after the row cannot have written it, so the pid was recycled.
_PID_REUSE_SLACK_S = 1.0


def close_dead_rows(session: Session, host: str) -> int:
    """Mark "interrupted" the running rows of `host` whose process is gone; returns the stage rows changed.

    Only rows of `host` are looked at: the pids of other hosts mean nothing here.
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
    changed = 0
    if dead_stages:
        result = session.execute(
            update(StageRun)
            .where(StageRun.id.in_(dead_stages), StageRun.status == "running")
            .values(status="interrupted", finished=now)
        )
        changed = result.rowcount
    if dead_runs:
        session.execute(
            update(Run)
            .where(Run.id.in_(dead_runs), Run.status == "running")
            .values(status="interrupted", finished=now)
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
