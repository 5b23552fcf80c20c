"""Serve error mapping without Serve: which store failures are the caller's (422) and which are the store's (503).

Real qdrant-client, grpc, httpx and Ray exception objects; the end-to-end cases are in test_serve.py.
"""

from __future__ import annotations

import httpx
import pytest
from grpc import StatusCode
from grpc.aio import AioRpcError
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from diffembed.serving.errors import BadSearchRequest, InvalidInput, StoreUnavailable, message_of, unwrap
from diffembed.serving.retriever import check_filter, classify_store_error

MISSING = "collection 'docs' does not exist at local path '/x'; fill it with the embed_corpus job first"


def response(status: int, body: bytes = b"") -> UnexpectedResponse:
    return UnexpectedResponse(status_code=status, reason_phrase=httpx.codes.get_reason_phrase(status), content=body,
                              headers=httpx.Headers({"content-type": "application/json"}))


def classify(exc, **kwargs):
    return classify_store_error(exc, missing=MISSING, **kwargs)


@pytest.mark.parametrize("status", [400, 422])
def test_qdrant_4xx_is_a_bad_request(status):
    body = b'{"status":{"error":"Bad request: Wrong input: invalid path meta[ in filter"},"time":0.001}'
    error = classify(response(status, body))
    assert type(error) is BadSearchRequest and isinstance(error, ValueError)
    assert "invalid path meta[" in str(error) and "Raw response" not in str(error)
    # without anything from the caller in the call (no filter) the same answer is the deployment's problem
    assert type(classify(response(status, body), caller_input=False)) is StoreUnavailable


def test_qdrant_404_is_a_missing_collection():
    error = classify(response(404, b'{"status":{"error":"Not found: Collection `docs` doesn\'t exist!"}}'))
    assert type(error) is StoreUnavailable and str(error) == MISSING


@pytest.mark.parametrize("status", [500, 502, 503, 401, 403, 408, 429])
def test_qdrant_5xx_and_server_side_4xx_are_unavailable(status):
    error = classify(response(status, b"upstream says no"))
    assert type(error) is StoreUnavailable and str(status) in str(error)


def test_unparsable_body_and_no_status():
    assert type(classify(response(400, b"<html>bad</html>"))) is BadSearchRequest
    no_status = UnexpectedResponse(status_code=None, reason_phrase="", content=b"", headers=httpx.Headers())
    assert type(classify(no_status)) is StoreUnavailable


@pytest.mark.parametrize(
    "exc",
    [
        ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused")),
        ResponseHandlingException(httpx.ReadTimeout("timed out")),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        httpx.ConnectError("refused"),
        RuntimeError("something else broke in the client"),
    ],
)
def test_connection_failures_and_timeouts_are_unavailable(exc):
    error = classify(exc, collection_exists=lambda: True)
    assert type(error) is StoreUnavailable and str(error).startswith("Qdrant unavailable")


@pytest.mark.parametrize(
    "code,kind",
    [
        (StatusCode.INVALID_ARGUMENT, BadSearchRequest),
        (StatusCode.OUT_OF_RANGE, BadSearchRequest),
        (StatusCode.NOT_FOUND, StoreUnavailable),
        (StatusCode.UNAVAILABLE, StoreUnavailable),
        (StatusCode.DEADLINE_EXCEEDED, StoreUnavailable),
        (StatusCode.INTERNAL, StoreUnavailable),
        (StatusCode.PERMISSION_DENIED, StoreUnavailable),
    ],
)
def test_grpc_status_codes(code, kind):
    exc = AioRpcError(code, None, None, details=f"{code.name}: details from the server")
    error = classify(exc)
    assert type(error) is kind
    if code == StatusCode.NOT_FOUND:
        assert str(error) == MISSING
    elif kind is BadSearchRequest:
        assert "details from the server" in str(error)


@pytest.fixture
def local_client(tmp_path):
    client = QdrantClient(path=str(tmp_path / "q"))
    client.create_collection("docs", vectors_config={"dense": models.VectorParams(size=4,
                                                                                  distance=models.Distance.COSINE)})
    client.upsert("docs", [models.PointStruct(id=1, vector={"dense": [1, 0, 0, 0]}, payload={"meta": {"lang": "en"}})])
    yield client
    client.close()


def raised(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no exception")


def test_local_mode_errors(local_client):
    """Local mode raises plain ValueErrors: a bad filter path is the caller's, a missing collection is not."""
    bad_path = raised(lambda: local_client.query_points(
        "docs", query=[1, 0, 0, 0], using="dense", limit=3,
        query_filter=models.Filter(must=[models.FieldCondition(key="meta[", match=models.MatchValue(value="x"))])))
    assert type(bad_path) is ValueError
    assert type(classify(bad_path, collection_exists=lambda: True)) is BadSearchRequest

    missing = raised(lambda: local_client.query_points("nope", query=[1, 0, 0, 0], using="dense", limit=3))
    exists = lambda: local_client.collection_exists("nope")  # noqa: E731 - what the retriever passes
    error = classify(missing, collection_exists=exists)
    assert type(error) is StoreUnavailable and str(error) == MISSING


def test_client_side_model_errors_are_bad_requests():
    """qdrant-client's request models reject a mixed-type MatchAny with a pydantic ValidationError."""
    exc = raised(lambda: models.MatchAny(any=["en", 1]))
    error = classify(exc, collection_exists=lambda: True)
    assert type(error) is BadSearchRequest and "any" in str(error)


def test_typed_errors_pass_through_and_ray_wrapping_is_unwrapped():
    from ray.exceptions import RayTaskError

    bad = BadSearchRequest("filter 'x': nope")
    assert classify(bad) is bad
    wrapped = RayTaskError("search", "Traceback ...\nBadSearchRequest: filter 'x': nope", bad).as_instanceof_cause()
    assert isinstance(wrapped, BadSearchRequest) and unwrap(wrapped) is bad
    twice = RayTaskError("handle", "tb", wrapped).as_instanceof_cause()  # crossed two deployments
    assert unwrap(twice) is bad and classify(twice) is bad
    opaque = RayTaskError("f", "Traceback (most recent call last):\n  ...\nValueError: the message", None)
    assert message_of(opaque) == "ValueError: the message"


def test_check_filter():
    check_filter(None)
    check_filter({"meta.lang": "en", "doc_id": ["a", "b"], "n": [1, 2], "flag": True, "none": []})
    with pytest.raises(BadSearchRequest, match="'meta.lang': a list must hold only strings or only integers"):
        check_filter({"doc_id": "a", "meta.lang": ["en", 1]})
    with pytest.raises(BadSearchRequest, match="'flags'"):
        check_filter({"flags": [True, False]})


def test_client_error_statuses():
    from ray.exceptions import RayTaskError

    from diffembed.serving.ingress import client_error

    def status(exc):
        error = client_error(RayTaskError("f", "tb", exc).as_instanceof_cause())
        return None if error is None else (error.status, error.type, error.code)

    assert status(BadSearchRequest("bad filter")) == (422, "invalid_request_error", "invalid_search")
    assert status(InvalidInput("no tokens left")) == (422, "invalid_request_error", "invalid_input")
    assert status(StoreUnavailable(MISSING)) == (503, "service_unavailable", "store_unavailable")
    assert status(KeyError("a bug")) is None  # internal: a 500


def test_overload_timeout_and_lost_replicas_are_not_500s():
    """A full queue is a 429 carrying its Retry-After; a lost deployment or the request deadline a 503."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from diffembed.serving.errors import Overloaded
    from diffembed.serving.ingress import client_error

    busy = client_error(Overloaded("the encoder is at capacity", retry_after_s=2.5))
    assert (busy.status, busy.type, busy.code, busy.retry_after_s) == (429, "overloaded_error", "overloaded", 2.5)
    # Serve's own error, as the retriever's call to the encoder raises it (wrapped once more by Ray)
    raw = BackPressureError(num_queued_requests=3, max_queued_requests=1, status_code=429, retry_after_s=4)
    wrapped = client_error(RayTaskError("search", "tb", raw).as_instanceof_cause())
    assert (wrapped.status, wrapped.code, wrapped.retry_after_s) == (429, "overloaded", 4)
    assert (client_error(TimeoutError()).status, client_error(TimeoutError()).code) == (503, "timeout")
    gone = client_error(DeploymentUnavailableError(DeploymentID(name="Encoder", app_name="x")))
    assert (gone.status, gone.code) == (503, "replica_unavailable")
    assert client_error(ActorDiedError()).status == 503


@pytest.mark.parametrize(
    "flt,ok",
    [
        ({"meta.lang": "en"}, True),
        ({"n": 2**63 - 1, "ns": [1, -(2**63)], "b": False, "e": []}, True),
        ({"meta.lang": ["en", 1]}, False),
        ({"flags": [True]}, False),
        ({"n": 2**63}, False),
        ({"n": [2**70]}, False),
        ({"": "x"}, False),
        ({"meta": {"lang": "en"}}, False),
        ({"n": 1.5}, False),
        ({"n": None}, False),
    ],
)
def test_search_request_filter_schema(flt, ok):
    from pydantic import ValidationError

    from diffembed.serving.api import SearchRequest

    if ok:
        assert SearchRequest.model_validate({"query": "q", "filter": flt}).filter == flt
    else:
        with pytest.raises(ValidationError):
            SearchRequest.model_validate({"query": "q", "filter": flt})
