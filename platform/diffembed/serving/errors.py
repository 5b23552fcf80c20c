"""Typed serving errors: what the ingress maps to HTTP statuses (no Ray, FastAPI or Qdrant imports here).

Deployments raise these; Ray wraps an exception raised in a replica in a `RayTaskError` (that is also an
instance of the original class, with the original in `.cause`), possibly more than once when it crosses
several deployments: `unwrap` gets the original back.
"""

from __future__ import annotations


class InvalidInput(ValueError):
    """The caller's input cannot be served as given (the ingress answers 422 with `code`)."""

    code = "invalid_input"


class BadSearchRequest(InvalidInput):
    """The store rejected a search because of the request (a bad filter key or value): 422."""

    code = "invalid_search"


class StoreUnavailable(RuntimeError):
    """Qdrant is unreachable, failing, or the collection does not exist (yet): the ingress answers 503."""


class CollectionMismatch(StoreUnavailable):
    """The collection was embedded by another embedding function than the served model's (its stored fingerprint
    differs: `diffembed.index.fingerprint.mismatch_message`): its scores would be meaningless. The ingress
    answers 503 (code `collection_mismatch`): the deployment, not the request, is wrong, and no search can succeed
    until the config or the collection changes."""


def unwrap(exc: BaseException) -> BaseException:
    """The original exception under any number of Ray `RayTaskError` wrappers."""
    seen = 0
    while seen < 16:
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            return exc
        exc, seen = cause, seen + 1
    return exc


def message_of(exc: BaseException, limit: int = 500) -> str:
    """A one-line message. A `RayTaskError` whose original could not be recovered carries a traceback in its
    text: its last line is the error itself."""
    text = str(exc).strip()
    if hasattr(exc, "traceback_str"):
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else ""
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Overloaded(RuntimeError):
    """A deployment's request queue is full (Serve's `max_queued_requests`): the ingress answers 429 with a
    `Retry-After` of `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keep retry_after_s across Ray's pickling
        return (type(self), (str(self), self.retry_after_s))
