"""Calls between deployments that survive a replica's death and report a full queue as `Overloaded`.

Embedding and search are idempotent, so a call whose replica died (killed, OOM, node lost) is sent again: the
handle routes the retry to another replica, or waits for Serve to restart one, as long as the request's
deadline allows. A full queue (Serve's `max_queued_requests` on the callee) is not retried here: it becomes
`Overloaded`, which the ingress answers with 429 and `Retry-After`, so overload never turns into unbounded
latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from diffembed.serving.errors import Overloaded, unwrap

log = logging.getLogger("ray.serve")

DEFAULT_DEADLINE_S = 60.0
RETRY_PAUSE_S = 0.05  # first pause before a retry, doubled up to 1 s


def replica_lost(exc: BaseException) -> bool:
    """True when the call failed because the replica running it went away (not because of the request)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError

    cause = unwrap(exc)
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)) or (
        isinstance(cause, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)))


def overloaded(exc: BaseException) -> Overloaded | None:
    from ray.serve.exceptions import BackPressureError

    cause = unwrap(exc)
    if isinstance(cause, Overloaded):
        return cause
    if isinstance(cause, BackPressureError):
        retry = getattr(cause, "retry_after_s", None) or 1.0
        queued = getattr(cause, "args", ())[:2]
        detail = f" ({queued[0]} requests already queued)" if len(queued) == 2 else ""
        return Overloaded(f"the server is at capacity{detail}; retry later", retry_after_s=float(retry))
    return None


async def call(method: Any, *args: Any, deadline_s: float = DEFAULT_DEADLINE_S, what: str = "call",
               **kwargs: Any) -> Any:
    """`await method.remote(*args, **kwargs)` on a deployment handle's method, sent again while the replica
    that took it was lost and the deadline (seconds from now) allows. `Overloaded` when the callee's queue is
    full; every other failure propagates unchanged."""
    deadline = time.monotonic() + deadline_s
    pause, attempt = RETRY_PAUSE_S, 0
    while True:
        attempt += 1
        try:
            return await method.remote(*args, **kwargs)
        except Exception as exc:
            busy = overloaded(exc)
            if busy is not None:
                raise busy from None
            if not replica_lost(exc) or time.monotonic() + pause >= deadline:
                raise
            log.warning("%s: replica lost (%s: attempt %d), retrying", what, type(unwrap(exc)).__name__, attempt)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)
