"""The run log's own errors."""

from t2v.errors import T2VError


class RunLogUnavailable(T2VError):
    """The run log database cannot be reached."""


class RunLogTooNew(RunLogUnavailable):
    """The run log's schema is at a migration this t2v does not have: a newer t2v wrote it."""


class NoSuchRun(T2VError, LookupError):
    """No run with this id is in the run log."""
