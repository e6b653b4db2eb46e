"""What run logs of releases before 0001 lack: two later columns, and TEXT for free-form values.

Those run logs were made by `create_all`, which never altered an existing table, so they are at one of
several stages: without `runs.jobs_json` (the first release), with VARCHAR(n) where the schema now says
TEXT (which PostgreSQL enforces and SQLite ignores), without `stage_runs.peak_cgroup_gib`. They are
stamped 0001 when first opened and this revision looks at what each has; on a run log that 0001 made it
finds nothing to do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADDED = {"runs": {"jobs_json": sa.Text()}, "stage_runs": {"peak_cgroup_gib": sa.Float()}}
"""Columns added after the first release (nullable, so the rows before them stay valid)."""

TEXT = {
    "runs": ("model", "catalogue", "host", "jobs_json"),
    "stage_runs": ("template", "model", "plan", "error", "output_key"),
}
"""The free-form columns: TEXT in 0001, VARCHAR(200) or (500) in releases before; a long `--model`
path crashed every run on PostgreSQL. `stage_runs.job_key` stays VARCHAR(128): it is indexed."""


def upgrade() -> None:
    bind = op.get_bind()
    # Sorted, so that the tables are altered in one order whatever the dict's.
    for table in sorted(ADDED):
        present = {c["name"] for c in sa.inspect(bind).get_columns(table)}
        for name, kind in ADDED[table].items():
            if name not in present:
                op.add_column(table, sa.Column(name, kind))
    if bind.dialect.name != "postgresql":
        return  # SQLite ignores VARCHAR lengths: an old file already takes any length
    for table in sorted(TEXT):
        for column in sa.inspect(bind).get_columns(table):
            if column["name"] in TEXT[table] and getattr(column["type"], "length", None) is not None:
                # VARCHAR to TEXT rewrites no rows on PostgreSQL.
                op.alter_column(table, column["name"], type_=sa.Text())


def downgrade() -> None:
    # 0001 has these columns and types already: going back to it changes nothing.
    pass
