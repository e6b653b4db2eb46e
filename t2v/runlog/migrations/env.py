"""Alembic's environment for the run log's migrations.

t2v runs them itself when it opens a run log (t2v.runlog.migrate.upgrade), on a connection that is
already inside its write transaction and lock; there is no alembic.ini and no offline (--sql) mode,
because the second revision inspects the database it upgrades.
"""

from alembic import context

from t2v.runlog.migrate import VERSION_TABLE
from t2v.runlog.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError(
        "the run log's migrations run on a live connection: open the run log with t2v "
        "(t2v.runlog.RunLog, or any `t2v` command that reads it) to upgrade it"
    )

# target_metadata: what autogenerate and tests/test_migrations.py compare the migrated tables with.
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
# Inside t2v's transaction this begins nothing: the whole upgrade commits or rolls back as one.
with context.begin_transaction():
    context.run_migrations()
