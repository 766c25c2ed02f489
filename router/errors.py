"""Every error the router reports, and the two ways it is written: an HTTP answer and an SSE event.

Hierarchy (the `type` string is stable: clients match on it and metrics use it as a label):

    RouterError                      500 internal_error
    ├── InvalidRequest               400 invalid_request_error   bad JSON, bad fields, bad image, bad parameters
    ├── Unauthenticated              401 authentication_error    no API key, or not a valid one (or, in the
    │                                                            console, no valid session cookie)
    ├── PermissionDenied             403 permission_denied       the key may not use the model, a console viewer
    │                                                            asked for an operator's page, or a console
    │                                                            write came without its CSRF token
    ├── NotFound                     404 not_found               no such path
    ├── ModelNotFound                404 model_not_found         no replica serves the model
    ├── MethodNotAllowed             405 method_not_allowed      the path does not take this method (Allow)
    ├── Conflict                     409 conflict                a rollout is already active, or has ended
    ├── RequestTooLarge              413 request_too_large       body over router.max_request_bytes
    ├── RateLimited                  429 rate_limit_exceeded     the key's quota is spent (Retry-After)
    ├── Overloaded                   503 overloaded              every replica slot and the wait queue are full,
    │                                                            or the wait ran out (Retry-After)
    ├── QuotaUnavailable             503 quota_unavailable       the shared quota store did not answer (Retry-After)
    ├── BatchStoreUnavailable        503 batch_store_unavailable the batch job store (Redis) did not answer
    ├── RolloutStoreUnavailable      503 rollout_store_unavailable  the rollout store (Redis) did not answer
    ├── NoHealthyReplica             503 no_healthy_replica      the model's replicas are all ejected (Retry-After)
    ├── UpstreamUnavailable          502 upstream_unavailable    every attempt failed before a byte was sent
    ├── UpstreamTimeout              504 upstream_timeout        the replica took longer than request_timeout_s
    └── StreamInterrupted            502 stream_interrupted      the replica died mid-stream (SSE only)

`code`, when set, says which rule refused the request; the codes are one closed set (`ErrorCode`), each
raised by exactly one class (`CODES`). The README's errors table and the OpenAPI document
(router/openapi.py) are checked against, or built from, that set.

Messages are written for the client; internal exception text never goes into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import orjson

# The codes of each class; `ErrorCode` is their union.
InternalCode = Literal["internal_error"]
InvalidRequestCode = Literal[
    # the edge (router/edge.py, router/images.py, qvl/dataurl.py, router/quota.py, router/app.py)
    "invalid_json",
    "invalid_parameters",
    "client_disconnected",
    "too_many_messages",
    "too_many_images",
    "unsupported_content",
    "n_too_large",
    "max_tokens_too_large",
    "invalid_stop",
    "unsupported_image_url",
    "invalid_image_url",
    "image_too_large",
    "unsupported_image_format",
    "invalid_image",
    "image_too_many_pixels",
    "image_aspect_ratio_too_large",
    "image_tokens_over_quota",
    # fetching image URLs (router/ssrf.py, router/fetch.py)
    "image_host_not_allowed",
    "image_url_forbidden_address",
    "image_url_redirect",
    "image_fetch_timeout",
    "image_fetch_failed",
    # the classes (router/classes.py) and the batch API (router/batch/)
    "invalid_service_tier",
    "invalid_file",
    "invalid_purpose",
    "invalid_batch",
    "batch_not_cancellable",
    # rollouts (router/rollout/)
    "invalid_rollout",
]
UnauthenticatedCode = Literal[
    "missing_api_key",
    "invalid_api_key",
    # the console's session cookie (router/console/session.py)
    "console_session_missing",
    "console_session_invalid",
    "console_session_expired",
]
PermissionDeniedCode = Literal["model_not_allowed", "operator_only", "csrf_token_invalid"]
NotFoundCode = Literal["unknown_path", "file_not_found", "batch_not_found", "rollout_not_found"]
ModelNotFoundCode = Literal["model_not_found"]
MethodNotAllowedCode = Literal["method_not_allowed"]
ConflictCode = Literal["rollout_active", "rollout_ended"]
RequestTooLargeCode = Literal["request_too_large", "file_too_large"]
RateLimitedCode = Literal["quota_exceeded", "flex_shed"]
OverloadedCode = Literal["queue_full", "queue_timeout"]
QuotaUnavailableCode = Literal["quota_unavailable"]
BatchStoreUnavailableCode = Literal["batch_store_unavailable"]
RolloutStoreUnavailableCode = Literal["rollout_store_unavailable"]
NoHealthyReplicaCode = Literal["no_healthy_replica"]
UpstreamUnavailableCode = Literal["upstream_unavailable"]
UpstreamTimeoutCode = Literal["upstream_timeout"]
StreamInterruptedCode = Literal["stream_interrupted"]
ErrorCode = Literal[
    InternalCode,
    InvalidRequestCode,
    UnauthenticatedCode,
    PermissionDeniedCode,
    NotFoundCode,
    ModelNotFoundCode,
    MethodNotAllowedCode,
    ConflictCode,
    RequestTooLargeCode,
    RateLimitedCode,
    OverloadedCode,
    QuotaUnavailableCode,
    BatchStoreUnavailableCode,
    RolloutStoreUnavailableCode,
    NoHealthyReplicaCode,
    UpstreamUnavailableCode,
    UpstreamTimeoutCode,
    StreamInterruptedCode,
]
"""Every `code` the router puts in an error; mypy refuses any other string."""


class RouterError(Exception):
    """Base of every error the router answers with; carries an HTTP status and a stable type."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode | None = code
        self.param = param
        self.retry_after_s = retry_after_s
        """Sent as a Retry-After header (whole seconds, at least 1) when set."""

    def payload(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-style error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers the answer carries besides its content type: Retry-After when `retry_after_s` is set."""
        if self.retry_after_s is None:
            return []
        return [(b"retry-after", b"%d" % max(1, math.ceil(self.retry_after_s)))]


class InvalidRequest(RouterError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(RouterError):
    status = 401
    type = "authentication_error"


class PermissionDenied(RouterError):
    status = 403
    type = "permission_denied"


class NotFound(RouterError):
    status = 404
    type = "not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message, code="method_not_allowed")
        self.allow = allow
        """The methods the path takes, as the Allow header lists them."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [*super().headers(), (b"allow", self.allow.encode("latin-1"))]


class Conflict(RouterError):
    status = 409
    type = "conflict"


class RateLimited(RouterError):
    status = 429
    type = "rate_limit_exceeded"


class Overloaded(RouterError):
    status = 503
    type = "overloaded"


class QuotaUnavailable(RouterError):
    status = 503
    type = "quota_unavailable"


class BatchStoreUnavailable(RouterError):
    status = 503
    type = "batch_store_unavailable"


class RequestTooLarge(RouterError):
    status = 413
    type = "request_too_large"


class ModelNotFound(RouterError):
    status = 404
    type = "model_not_found"


class RolloutStoreUnavailable(RouterError):
    status = 503
    type = "rollout_store_unavailable"


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


_BY_CLASS: dict[type[RouterError], Any] = {
    RouterError: InternalCode,
    InvalidRequest: InvalidRequestCode,
    Unauthenticated: UnauthenticatedCode,
    PermissionDenied: PermissionDeniedCode,
    NotFound: NotFoundCode,
    ModelNotFound: ModelNotFoundCode,
    MethodNotAllowed: MethodNotAllowedCode,
    Conflict: ConflictCode,
    RequestTooLarge: RequestTooLargeCode,
    RateLimited: RateLimitedCode,
    Overloaded: OverloadedCode,
    QuotaUnavailable: QuotaUnavailableCode,
    BatchStoreUnavailable: BatchStoreUnavailableCode,
    RolloutStoreUnavailable: RolloutStoreUnavailableCode,
    NoHealthyReplica: NoHealthyReplicaCode,
    UpstreamUnavailable: UpstreamUnavailableCode,
    UpstreamTimeout: UpstreamTimeoutCode,
    StreamInterrupted: StreamInterruptedCode,
}
CODES: dict[ErrorCode, type[RouterError]] = {code: cls for cls, codes in _BY_CLASS.items() for code in get_args(codes)}
"""The class (so the status and type) that raises each code, in the order of `ErrorCode`."""


def error_code(value: str) -> ErrorCode:
    """`value` as an ErrorCode, for codes that come from a lower layer as plain strings (qvl/dataurl.py).

    Raises ValueError for a string outside the set.
    """
    for code in CODES:
        if code == value:
            return code
    raise ValueError(f"not an error code: {value!r}")


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error as an HTTP answer: status, headers (content type first) and body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def error_answer(exc: RouterError) -> ErrorAnswer:
    """The HTTP answer to `exc`: its status, the OpenAI-style JSON body, and Retry-After (or Allow) where it applies.

    Every error the router answers goes through here, on the raw chat path and the FastAPI routes alike.
    """
    return ErrorAnswer(
        exc.status, [(b"content-type", b"application/json"), *exc.headers()], orjson.dumps(exc.payload())
    )


def sse_error_event(exc: RouterError) -> bytes:
    """The error as it ends a stream: one `data:` event with the same object, then `[DONE]`."""
    return b"data: " + orjson.dumps(exc.payload()) + b"\n\ndata: [DONE]\n\n"
