"""Errors the product raises on bad input or configuration.

Every error names the file or parameter at fault so the message alone tells the user
what to fix; the CLI shows it without a deep library traceback.
"""


class ImsvdError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(ImsvdError, ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


class DataError(ImsvdError, ValueError):
    """Input data cannot be read or fails a structural check (names the file)."""


class ValidationFailed(ImsvdError):
    """The Great Expectations suite failed; the message lists each failed expectation."""


class TrainingError(ImsvdError, RuntimeError):
    """Training cannot go on (for example a non-finite loss)."""


class UntrustedFileError(ImsvdError):
    """A file carries content that is not allowed to be loaded (for example pickled code)."""


def check_positive(value: float, name: str) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value > 0`` (NaN fails too)."""
    if not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
