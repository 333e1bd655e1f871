"""Errors that carry a message meant for a person. The CLI prints them as one line, no traceback."""


class AseRayError(Exception):
    """Base class: anything raised with this type is a user-facing problem, not a bug."""


class ConfigError(AseRayError):
    """A config file, key, value or override is wrong."""


class ManifestError(AseRayError):
    """A manifest cannot be read, or misses required columns."""


class DataError(AseRayError):
    """A dataset cannot be built or used (missing folder, no images, bad split request...)."""


class SearchError(AseRayError):
    """A hyperparameter search was interrupted or ended without a usable trial."""

class RequestError(AseRayError):
    """A bad HTTP request to the Serve endpoint: answered with ``status`` (4xx) and a JSON body
    ``{"error": code, "detail": message}``, never a stack trace."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # sent as Retry-After (503: try again then)
