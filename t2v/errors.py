"""Named errors. The CLI turns each into a one-line message and exit status 2."""


class T2VError(Exception):
    """Base of every error the user can fix; the message says what to change."""


class InvalidInput(T2VError, ValueError):
    """A job, catalogue, watermark or option breaks a rule; the message names the field and its value."""


class CatalogueError(InvalidInput):
    """The template catalogue file cannot be used as it is."""


class ModelNotFound(T2VError):
    """The `--model` value is neither a built-in model nor a Wan2.2 diffusers folder or hub id."""


class NoPlanFits(T2VError):
    """Every memory plan for a stage ran out of memory."""


class StoreDamaged(T2VError):
    """A stored output a stage needs is missing or failed its digest check (and was moved aside)."""


class NonFiniteOutput(T2VError):
    """A stage computed NaN or infinite values: nothing is stored or published."""
