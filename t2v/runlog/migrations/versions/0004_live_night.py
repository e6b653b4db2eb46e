"""What the dashboard needs to watch a night as it runs: each job's step, a memory timeline, a heartbeat.

`progress` has one row per (run, template, stage), updated in place at most once a second; `timeline`
holds a run's memory samples packed a minute to a row (`t2v.runlog.live.pack`), so an eight-hour night
is 480 small rows, not 28,800; `runs.heartbeat` is when the run's live recorder last wrote. All new, so
every row an older release wrote stays as it was (its runs have no heartbeat, progress or timeline).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Each part only where it is missing, as 0002 does: a run log made by `create_all` of a newer schema
    # than its stamp (as tests/test_postgres.py makes "the release before migrations") has them already.
    found = sa.inspect(op.get_bind())
    if "heartbeat" not in {c["name"] for c in found.get_columns("runs")}:
        op.add_column("runs", sa.Column("heartbeat", sa.DateTime(timezone=True)))
    if not found.has_table("progress"):
        op.create_table(
            "progress",
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
            sa.Column("template", sa.Text(), nullable=False),
            sa.Column("stage", sa.String(16), nullable=False),
            sa.Column("step", sa.Integer(), nullable=False),
            sa.Column("steps", sa.Integer()),
            sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        )
        op.create_index("ix_progress_run_id", "progress", ["run_id"])
    if not found.has_table("timeline"):
        op.create_table(
            "timeline",
            sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), primary_key=True),
            sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column("samples", sa.LargeBinary(), nullable=False),
        )


def downgrade() -> None:
    # t2v has no downgrades (README, The run log): a release at 0003 refuses this log as too new.
    pass
