"""The run log's tables as the first versioned release has them.

The same tables, columns and indexes that `create_all` made for the release before migrations, so a run
log made by that release (stamped with this revision when first opened) and one made by this migration
have one schema; revision 0002 adds what run logs of even older releases lack.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("catalogue", sa.Text()),
        sa.Column("parent_run_id", sa.String(32)),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("jobs_json", sa.Text()),
    )
    op.create_table(
        "stage_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("job_key", sa.String(128), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("plan", sa.Text()),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True)),
        sa.Column("wall_s", sa.Float()),
        sa.Column("peak_allocated_gib", sa.Float()),
        sa.Column("peak_reserved_gib", sa.Float()),
        sa.Column("peak_nvml_gib", sa.Float()),
        sa.Column("peak_rss_gib", sa.Float()),
        sa.Column("peak_cgroup_gib", sa.Float()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("output_key", sa.Text()),
        sa.Column("pid", sa.Integer(), nullable=False),
    )
    op.create_index("ix_stage_runs_run_id", "stage_runs", ["run_id"])
    op.create_index("ix_stage_runs_job_key", "stage_runs", ["job_key"])


def downgrade() -> None:
    op.drop_table("stage_runs")
    op.drop_table("runs")
