"""Every error the router reports, and the two ways it is written: a JSON response and an SSE event.

Hierarchy (the `type` string is stable: clients match on it and metrics use it as a label):

    RouterError                      500 internal_error
    ├── InvalidRequest               400 invalid_request_error   bad JSON, bad fields, bad image
    ├── Unauthenticated              401 authentication_error    no API key, or not a valid one
    ├── PermissionDenied             403 permission_denied       the key may not use the model
    ├── RequestTooLarge              413 request_too_large       body over router.max_request_bytes
    ├── ModelNotFound                404 model_not_found         no replica serves the model
    ├── RateLimited                  429 rate_limit_exceeded     the key's quota is spent (Retry-After)
    ├── Overloaded                   503 overloaded              every replica slot and the wait queue are full,
    │                                                            or the wait ran out (Retry-After)
    ├── QuotaUnavailable             503 quota_unavailable       the shared quota store did not answer (Retry-After)
    ├── NoHealthyReplica             503 no_healthy_replica      the model's replicas are all ejected
    ├── UpstreamUnavailable          502 upstream_unavailable    every attempt failed before a byte was sent
    ├── UpstreamTimeout              504 upstream_timeout        the replica took longer than request_timeout_s
    └── StreamInterrupted            502 stream_interrupted      the replica died mid-stream (SSE only)

Messages are written for the client; internal exception text never goes into them.
"""

from __future__ import annotations

from typing import ClassVar

import orjson


class RouterError(Exception):
    """Base of every error the router answers with; carries an HTTP status and a stable type."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        """Sent as a Retry-After header (whole seconds, at least 1) when set."""

    def payload(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-style error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(RouterError):
    status = 401
    type = "authentication_error"


class PermissionDenied(RouterError):
    status = 403
    type = "permission_denied"


class RateLimited(RouterError):
    status = 429
    type = "rate_limit_exceeded"


class Overloaded(RouterError):
    status = 503
    type = "overloaded"


class QuotaUnavailable(RouterError):
    status = 503
    type = "quota_unavailable"


class RequestTooLarge(RouterError):
    status = 413
    type = "request_too_large"


class ModelNotFound(RouterError):
    status = 404
    type = "model_not_found"


class NoHealthyReplica(RouterError):
    status = 503
    type = "no_healthy_replica"


class UpstreamUnavailable(RouterError):
    status = 502
    type = "upstream_unavailable"


class UpstreamTimeout(RouterError):
    status = 504
    type = "upstream_timeout"


class StreamInterrupted(RouterError):
    status = 502
    type = "stream_interrupted"


def error_body(exc: RouterError) -> bytes:
    """The JSON body of an error response."""
    return orjson.dumps(exc.payload())


def sse_error_event(exc: RouterError) -> bytes:
    """The error as it ends a stream: one `data:` event with the same object, then `[DONE]`."""
    return b"data: " + orjson.dumps(exc.payload()) + b"\n\ndata: [DONE]\n\n"
