"""The run log's own errors."""

from t2v.errors import T2VError


class RunLogUnavailable(T2VError):
    """The run log database cannot be reached."""


class NoSuchRun(T2VError, LookupError):
    """No run with this id is in the run log."""
