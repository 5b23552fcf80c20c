"""The serving app's HTTP contract: quantized outputs, the request models, and a schema fuzzer against the live app.

The fuzzer (schemathesis) generates requests from the app's own `/openapi.json`, valid and invalid, sends them
to a real local Serve app (the packaged MiniLM, a small store filled by the batch job) and checks every answer:
no 5xx, a documented status, a JSON body that matches the declared schema.
"""

from __future__ import annotations

import base64
import concurrent.futures
import re
import time

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from diffembed.serving import quantize
from diffembed.serving.api import EmbeddingsRequest, EmbedRequest
from diffembed.serving.config import ServeArgs

# ---------------------------------------------------------------------------------------------- quantization


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_int8_calibration_is_fixed_and_symmetric():
    dim = 384
    step = quantize.int8_step(dim)
    assert step == pytest.approx(6.0 / (127 * np.sqrt(dim)))
    v = np.zeros((1, dim), np.float32)
    v[0, 0], v[0, 1], v[0, 2] = 1.0, -1.0, step * 10.4  # two clipped coordinates, one in range
    q = quantize.to_int8(v)
    assert q.dtype == np.int8 and q[0, :3].tolist() == [127, -127, 10] and not q[0, 3:].any()
    x = unit_vectors(5, dim, 0)
    np.testing.assert_array_equal(quantize.to_int8(-x), -quantize.to_int8(x))  # zero maps to zero, no offset
    np.testing.assert_array_equal(quantize.to_uint8(x).astype(int), quantize.to_int8(x).astype(int) + 128)
    # the same vector gives the same code alone or in any batch (no per-request calibration)
    np.testing.assert_array_equal(quantize.to_int8(x[:1]), quantize.to_int8(x)[:1])
    # dequantised coordinates are within half a step of the original (nothing of a random unit vector is clipped)
    assert np.abs(quantize.to_int8(x) * step - x).max() <= step / 2 + 1e-7


def test_int8_dot_products_rank_like_float():
    docs, queries = unit_vectors(500, 384, 1), unit_vectors(20, 384, 2)
    exact = queries @ docs.T  # (20, 500)
    q8, d8 = quantize.to_int8(queries).astype(np.int32), quantize.to_int8(docs).astype(np.int32)
    approx = (q8 @ d8.T) * quantize.int8_step(384) ** 2
    assert np.abs(approx - exact).max() < 0.01
    for row in range(len(queries)):
        assert spearman(exact[row], approx[row]) > 0.999
        assert len(set(np.argsort(-exact[row])[:10]) & set(np.argsort(-approx[row])[:10])) >= 9
    u8 = quantize.to_uint8(docs).astype(np.int32) - 128  # uint8 ranks the same after removing its offset
    np.testing.assert_array_equal(u8, d8)


def test_binary_bit_packing_is_exact():
    x = np.array([[1, -1, 1, 1, -1, -1, -1, -1, 1, -1]], np.float32)  # D=10: bits 10110000 10(000000)
    assert quantize.to_ubinary(x).tolist() == [[0b10110000, 0b10000000]]
    assert quantize.to_binary(x).tolist() == [[0b10110000 - 128, 0b10000000 - 128]]
    assert quantize.to_ubinary(np.zeros((1, 8), np.float32)).tolist() == [[0]]  # 0 is not > 0
    y = unit_vectors(7, 384, 3)
    packed = quantize.to_ubinary(y)
    assert packed.shape == (7, 48) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(packed, axis=-1)[:, :384].astype(bool), y > 0)
    # the conventions of sentence-transformers' quantize_embeddings, byte for byte
    from sentence_transformers.util import quantize_embeddings

    np.testing.assert_array_equal(quantize.to_binary(y), quantize_embeddings(y, "binary"))
    np.testing.assert_array_equal(quantize.to_ubinary(y), quantize_embeddings(y, "ubinary"))


def test_binary_hamming_tracks_the_angle():
    rng = np.random.default_rng(4)
    a = unit_vectors(300, 384, 5)
    noise = unit_vectors(300, 384, 6)
    t = rng.uniform(0, 3, size=(300, 1)).astype(np.float32)
    b = a + t * noise
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.sum(a * b, axis=1)
    hamming = np.unpackbits(quantize.to_ubinary(a) ^ quantize.to_ubinary(b), axis=-1).sum(axis=1) / 384
    # sign bits of a random hyperplane basis disagree with probability angle / pi
    assert np.corrcoef(hamming, np.arccos(np.clip(cos, -1, 1)) / np.pi)[0, 1] > 0.95


def test_encode_formats():
    x = unit_vectors(2, 16, 7)
    assert [row.tolist() for row in quantize.encode(x, "float")] == x.tolist()
    decoded = [np.frombuffer(base64.b64decode(s), dtype="<f4") for s in quantize.encode(x, "base64")]
    np.testing.assert_array_equal(np.stack(decoded), x)
    assert [row.tolist() for row in quantize.encode(x, "int8")] == quantize.to_int8(x).tolist()
    assert all(len(row) == 2 for row in quantize.encode(x, "binary"))  # ceil(16 / 8)


# ---------------------------------------------------------------------------------------------- request models


@pytest.mark.parametrize("value", ["a", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [0]])
def test_inputs_accepted(value):
    assert EmbeddingsRequest.model_validate({"input": value}).input == value
    assert EmbedRequest.model_validate({"inputs": value}).inputs == value


@pytest.mark.parametrize(
    "value", [[], "", [[]], [[1], []], [-1], [[0, -5]], ["a", 1], [1, "a"], [[1], "a"], [1, [2]], [True], [1.5],
              [2**40], None, 5, {"a": 1}],
)
def test_inputs_rejected(value):
    with pytest.raises(ValidationError):
        EmbeddingsRequest.model_validate({"input": value})
    with pytest.raises(ValidationError):
        EmbedRequest.model_validate({"inputs": value})


def test_input_type_and_instruction():
    assert EmbeddingsRequest.model_validate({"input": "a"}).input_type == "document"
    assert EmbedRequest.model_validate({"inputs": "a"}).kind == "document"
    assert EmbedRequest.model_validate({"inputs": "a", "instruction": "Find"}).kind == "query"
    assert EmbedRequest.model_validate({"inputs": "a", "input_type": "query"}).kind == "query"
    for body in ({"input": "a", "instruction": "Find"}, {"input": "a", "input_type": "document", "instruction": "x"}):
        with pytest.raises(ValidationError, match="queries only"):
            EmbeddingsRequest.model_validate(body)
    with pytest.raises(ValidationError, match="queries only"):
        EmbedRequest.model_validate({"inputs": "a", "input_type": "document", "instruction": "x"})
    with pytest.raises(ValidationError, match="normalize=true"):
        EmbedRequest.model_validate({"inputs": "a", "normalize": False, "encoding_format": "int8"})
    with pytest.raises(ValidationError):
        EmbeddingsRequest.model_validate({"input": "a", "encoding_format": "int4"})


def test_openapi_declares_every_body():
    """Offline: every POST has a JSON request body, every route a 200 schema, errors the error body."""
    from diffembed.serving.ingress import app

    assert_complete_openapi(app.openapi())


def assert_complete_openapi(spec: dict) -> None:
    routes = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes == {("post", "/v1/embeddings"), ("post", "/embed"), ("post", "/search"), ("get", "/v1/models"),
                      ("get", "/healthz"), ("get", "/readyz")}
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok.get("$ref", "").split("/")[-1] in schemas, (method, path)
            for status, response in op["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
                assert body in schemas and schemas[body]["properties"], (path, body)
                assert {"400", "401", "413", "422", "429", "503"} <= set(op["responses"]), path
    assert set(schemas["ErrorDetail"]["required"]) == {"message", "type", "code", "request_id"}


# ---------------------------------------------------------------------------------------------- the live app

API_KEY = "contract-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = {"max_inputs_per_request": 4, "max_chars_per_input": 300, "max_body_bytes": 8000, "max_top_k": 10}


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory):
    """The app with small limits (generated inputs stay cheap) over a store the batch job filled."""
    from ray import serve
    from test_serve import EMBEDDER, filled_store, start_app

    store = filled_store(tmp_path_factory.mktemp("contract"))
    args = ServeArgs.model_validate({
        "embedder": EMBEDDER, "store": store, "api_key": API_KEY, "limits": LIMITS,
        "encoder": {"num_cpus": 0.5, "torch_threads": 1, "num_replicas": 1, "max_batch_tokens": 2048},
    })
    yield start_app(args, "contract")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live, headers=AUTH, timeout=60) as c:
        yield c


def test_live_openapi_is_complete(client):
    spec = client.get("/openapi.json").json()
    assert_complete_openapi(spec)


FUZZ_EXAMPLES = {"positive": 200, "negative": 160}  # per POST operation; the GETs have nothing to vary


def test_schema_fuzzing(live):
    """>= 1,000 generated requests over every route: 0 x 5xx, 0 undocumented statuses, 0 schema violations."""
    import requests
    import schemathesis

    # a request over a size limit is rejected with 413 before validation, whatever else is wrong with it
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "413", "422"]}}})
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json", config=config)
    session = requests.Session()
    counts: dict[str, int] = {}
    statuses: dict[int, int] = {}
    failures: list[str] = []
    started = time.perf_counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in ["positive", "negative"] if operation.method.upper() == "POST" else ["positive"]:
            fuzz(operation, mode, live, session, counts, statuses, failures)
    elapsed = time.perf_counter() - started
    total = sum(counts.values())
    summary = f"{total} cases in {elapsed:.0f} s; statuses {dict(sorted(statuses.items()))}; per operation {counts}"
    print(summary)
    assert not failures, f"{len(failures)} failures ({summary}):\n" + "\n\n".join(failures[:5])
    assert not any(status >= 500 for status in statuses), summary
    assert total >= 1000, summary
    assert statuses.get(200, 0) >= 200, summary  # the valid half really reaches the encoder and the store


def fuzz(operation, mode: str, base_url: str, session, counts: dict, statuses: dict, failures: list) -> None:
    """Send FUZZ_EXAMPLES[mode] generated cases of one operation; count them and collect failed checks."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_headers_conformance, response_schema_conformance,
                                                   status_code_conformance)

    label = f"{operation.method.upper()} {operation.path} {mode}"
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance] + ([negative_data_rejection] if mode == "negative" else [])

    @settings(max_examples=FUZZ_EXAMPLES[mode], derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case):
        response = case.call(base_url=base_url, session=session, headers=AUTH, timeout=60)
        counts[label] = counts.get(label, 0) + 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        try:  # collected, not raised: no shrinking, every failure is reported at the end
            case.validate_response(response, checks=checks, headers=AUTH)
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis raises a group of check failures
            failures.append(f"{label}: {exc}"[:2000])

    run()


# ---------------------------------------------------------------------------------------------- HTTP details


@pytest.mark.parametrize("method,path,allow", [("DELETE", "/v1/embeddings", "POST"), ("GET", "/embed", "POST"),
                                               ("PUT", "/search", "POST"), ("POST", "/healthz", "GET"),
                                               ("POST", "/v1/models", "GET")])
def test_405_carries_allow(client, method, path, allow):
    r = client.request(method, path)
    assert r.status_code == 405, r.text
    assert allow in r.headers["allow"]
    error = r.json()["error"]
    assert error["code"] == "method_not_allowed" and error["request_id"]


def test_request_ids(live, client):
    sane = "client-id_1.2"
    r = client.post("/v1/embeddings", json={"input": []}, headers={"X-Request-Id": sane})
    assert r.status_code == 422
    assert r.headers.get_list("x-request-id") == [sane]  # one header: Serve's proxy echoes the client's id
    assert r.json()["error"]["request_id"] == sane
    ok = client.post("/v1/embeddings", json={"input": "hello"})
    assert ok.status_code == 200 and re.fullmatch(r"[A-Za-z0-9._-]{1,128}", ok.headers["x-request-id"])
    # no client id: the proxy's generated id is the request's id, in the header and in the error body
    missing = client.post("/embed", content=b"{", headers={"content-type": "application/json"})
    assert missing.status_code == 400 and missing.json()["error"]["request_id"] == missing.headers["x-request-id"]
    for bad in ("x" * 129, "has space", "semi;colon"):
        r = client.post("/embed", json={"inputs": []}, headers={"X-Request-Id": bad})
        rid = r.json()["error"]["request_id"]
        assert rid != bad and re.fullmatch(r"[0-9a-f]{32}", rid)
        assert rid in r.headers.get_list("x-request-id")  # next to the proxy's echo of the client's value
    unknown = client.get("/nope", headers={"X-Request-Id": sane})
    assert unknown.status_code == 404 and unknown.json()["error"]["request_id"] == sane


def test_healthz_and_readyz(live):
    health = httpx.get(f"{live}/healthz")  # no key needed
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{live}/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["encoder_replicas"] == 1
    assert body["store"]["collection"] == "docs" and body["store"]["points"] > 0


def test_models_card(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "all-MiniLM-L6-v2" and card["dimensions"] == 384 and card["max_tokens"] == 64
    assert card["vocab_size"] == 30522  # encoder.info's vocab_size (the lead's encoder change)
    assert set(card["encoding_formats"]) == {"float", "base64", "int8", "uint8", "binary", "ubinary"}


def test_overload_is_429_with_retry_after(live):
    """A tiny encoder queue (1 running + 1 queued) under a burst: the extra requests are refused with 429, a
    Retry-After and the JSON error body; none is a 5xx."""
    from ray import serve

    from diffembed.serving.app import app_builder
    from test_serve import EMBEDDER, wait_ready

    args = ServeArgs.model_validate({
        "embedder": EMBEDDER, "retry_after_s": 2.5,
        "encoder": {"num_cpus": 0.5, "torch_threads": 1, "num_replicas": 1, "max_ongoing_requests": 1,
                    "max_queued_requests": 1, "batch_wait_timeout_s": 0.05},
    })
    serve.run(app_builder(args), name="busy", route_prefix="/busy", blocking=False)
    try:
        wait_ready(f"{live}/busy")
        body = {"input": ["a sentence long enough to take a moment to embed, " * 6] * 8}

        def post(_):
            return httpx.post(f"{live}/busy/v1/embeddings", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(post, range(24)))
        codes = [r.status_code for r in answers]
        assert not [c for c in codes if c >= 500], codes
        refused = [r for r in answers if r.status_code == 429]
        assert refused and 200 in codes, codes
        for r in refused:
            assert r.headers["retry-after"] == "3"  # whole seconds, rounded up
            error = r.json()["error"]
            assert error["type"] == "overloaded_error" and error["code"] == "overloaded" and error["request_id"]
        ready = httpx.get(f"{live}/busy/readyz").json()
        assert ready["store"] is None and ready["encoder_replicas"] == 1
    finally:
        serve.delete("busy")
