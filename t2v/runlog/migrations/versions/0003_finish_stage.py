"""The last stage's rows under its current name: "watermark" became "finish".

Readers (the dashboard, `t2v rerun`, attempt numbers) then see one name per stage whatever release wrote
the row. Before migrations, every open of the run log did this; it is needed once. A process of a
release before the rename that still runs beside this one may write "watermark" rows later:
`t2v.runlog.schema.names_of` counts them as attempts of "finish".

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE stage_runs SET stage = 'finish' WHERE stage = 'watermark'")


def downgrade() -> None:
    # Not reversible: rows that were always "finish" cannot be told from renamed ones, and a release
    # at 0002 reads "finish" rows as well.
    pass
