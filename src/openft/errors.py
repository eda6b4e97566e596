"""Domain exceptions. The API turns these (and only these) into OpenAI error JSON.

Anything else that escapes a route is our bug and becomes a logged 500.
"""

from __future__ import annotations


class OpenFTError(Exception):
    """Base of every error the user caused or can act on."""

    status_code: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(OpenFTError):
    """Bad input or an illegal state change (400, never retried)."""


class Unauthorized(OpenFTError):
    status_code = 401
    error_type = "invalid_request_error"


class NotFound(OpenFTError):
    status_code = 404


class Conflict(OpenFTError):
    """A state conflict. Sent as 400 (not 409) so the SDK does not retry it."""


class PayloadTooLarge(OpenFTError):
    status_code = 413


class Unprocessable(OpenFTError):
    status_code = 422


class RateLimited(OpenFTError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(OpenFTError):
    """The server cannot serve this now (e.g. it is shutting down): 503, which the SDK retries."""

    status_code = 503
    error_type = "server_error"


class JobFailed(OpenFTError):
    """Raised inside the worker; becomes the job's ``error{code, message, param}``."""

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


class JobCancelled(Exception):
    """Raised inside the worker when the user cancelled (or paused) a job mid-training."""
