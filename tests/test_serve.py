"""The serving application end to end: a real local Ray Serve app over a collection filled by the batch job."""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffembed.batch.config import EmbedCorpusConfig
from diffembed.batch.pipeline import embed_corpus
from diffembed.serving.config import ServeArgs
from ray_head import free_port

API_KEY = "test-secret"
EMBEDDER = {"model": "all-MiniLM-L6-v2", "max_length": 64, "documents": {"windows": "best", "overlap": 8}}
TOPICS = ["river", "mountain", "forest", "harbour", "castle", "library", "market", "garden", "bridge", "glacier"]


def make_corpus(path):
    docs = []
    for i, topic in enumerate(TOPICS):
        n = 30 if i % 3 == 0 else 2  # some documents span several windows (chunks)
        text = " ".join(f"Document {i} talks about the {topic}, sentence {j}." for j in range(n))
        docs.append({"id": f"doc-{i}", "text": text, "title": f"About the {topic}", "lang": "en" if i % 2 else "de"})
    docs[4]["text"] += " The zyxovian lantern glowed in the hall."  # a rare exact term for hybrid search
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def wait_ready(url: str, timeout_s: float = 120) -> None:
    """Until `url`/readyz answers 200 (encoder running, store answering), or the test fails."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            pytest.fail(f"{url} did not become ready in {timeout_s} s")
        time.sleep(0.5)


def start_app(args: ServeArgs, name: str) -> str:
    """Serve's HTTP proxy on a free loopback port, the app `args` build deployed as `name`, once ready: its URL."""
    from ray import serve

    from diffembed.serving.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(args), name=name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def filled_store(root: Path) -> dict:
    """The store config of a collection under `root` holding `make_corpus`'s documents, as the batch job wrote
    them. The job runs once per test session, into a folder no app ever opens; each module's app serves its own
    copy of that folder (an Edge store has one owner process; an app cannot touch another module's data)."""
    template = root.parent / "served-collection"  # the session's pytest base directory
    store = {"path": str(template / "qdrant"), "collection": "docs", "sparse": True, "upsert_batch_size": 16}
    if not (template / "done").is_file():
        template.mkdir(exist_ok=True)
        make_corpus(template / "corpus.jsonl")
        embed_corpus(EmbedCorpusConfig.from_dict({
            "embedder": EMBEDDER,
            "input": {"paths": [str(template / "corpus.jsonl")], "title_column": "title",
                      "metadata_columns": ["lang"]},
            "encode": {"actors": 1, "batch_size": 8},
            "store": store,
        }), progress=False)  # the job's store is closed when it returns: the folder can be copied
        (template / "done").touch()
    shutil.copytree(template, root, dirs_exist_ok=True)
    return {**store, "path": str(root / "qdrant")}


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    store = filled_store(tmp_path_factory.mktemp("serve"))
    args = ServeArgs.model_validate({
        "embedder": EMBEDDER,
        "store": store,
        "api_key": API_KEY,
        "encoder": {
            "num_cpus": 0.5, "torch_threads": 1, "max_batch_tokens": 4096, "batch_wait_timeout_s": 0.005,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                            "upscale_delay_s": 1, "downscale_delay_s": 600},
        },
        "limits": {"max_inputs_per_request": 8, "max_chars_per_input": 5000, "max_body_bytes": 20000},
    })
    yield start_app(args, "diffembed")
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def embedder():
    from diffembed import Embedder, EmbedderConfig

    return Embedder(EmbedderConfig.model_validate(EMBEDDER))


TEXTS = ["The castle stands on the hill.", "A short one.", "word " * 200]  # the last is truncated at 64 tokens


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_matches_embedder(server, embedder, encoding_format):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    response = oai.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format=encoding_format)
    got = np.array([d.embedding for d in response.data], dtype=np.float32) if encoding_format == "float" else None
    if encoding_format == "base64":  # the client returns our base64 string untouched when asked for base64
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    # the policy is `best` (one point per window): truncated by default, a long input gets its first window's vector
    windows = embedder.encode_document_windows(TEXTS)
    want = windows.vectors[windows.chunk_index == 0]
    assert [d.index for d in response.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert response.usage.prompt_tokens == sum(len(s.ids) for s in embedder.document_segments(TEXTS, windows="first"))
    assert response.model == "all-MiniLM-L6-v2"


def test_openai_default_and_dimensions(server, embedder):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    full = embedder.encode_documents(["hello world"])[0]
    plain = oai.embeddings.create(model="m", input="hello world")  # client default: base64, decoded by the client
    np.testing.assert_allclose(plain.data[0].embedding, full, atol=1e-5)
    short = np.array(oai.embeddings.create(model="m", input="hello world", dimensions=32).data[0].embedding)
    assert short.shape == (32,)
    np.testing.assert_allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-5)


def test_embed_tei_style(client, embedder):
    r = client.post("/embed", json={"inputs": "A short one."})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()[0], embedder.encode_documents(["A short one."])[0], atol=1e-5)
    q = client.post("/embed", json={"inputs": ["castle"], "instruction": "Find a place"}).json()
    np.testing.assert_allclose(q[0], embedder.encode_queries(["castle"], instruction="Find a place")[0], atol=1e-5)
    raw = np.array(client.post("/embed", json={"inputs": ["castle"], "normalize": False}).json()[0])
    assert abs(np.linalg.norm(raw) - 1) > 1e-3


def test_truncate_false_rejects_long_input(client):
    r = client.post("/embed", json={"inputs": ["word " * 200], "truncate": False})  # several windows, policy best
    assert r.status_code == 422 and "truncate=true" in r.json()["error"]["message"]
    r = client.post("/embed", json={"inputs": ["word " * 200], "truncate": False, "instruction": "Find it"})  # a query
    assert r.status_code == 422 and "max_length" in r.json()["error"]["message"]
    assert client.post("/embed", json={"inputs": ["word " * 200], "truncate": True}).status_code == 200


def test_served_vector_equals_the_stored_point(client, embedder):
    """/v1/embeddings of a document (title joined as the policy joins it) is the vector the batch job stored:
    the /search score of that document equals the query vector · the served vector."""
    topic, i = "mountain", 1  # a one-window document of make_corpus, with a title
    text = " ".join(f"Document {i} talks about the {topic}, sentence {j}." for j in range(2))
    served = client.post("/v1/embeddings", json={"input": f"About the {topic} {text}", "truncate": False})
    assert served.status_code == 200, served.text
    vector = np.array(served.json()["data"][0]["embedding"])
    query = "Which document is about the mountain?"
    hits = client.post("/search", json={"query": query, "top_k": 10}).json()["data"]
    hit = next(h for h in hits if h["doc_id"] == f"doc-{i}")
    assert hit["score"] == pytest.approx(float(embedder.encode_queries([query])[0] @ vector), abs=1e-5)


def test_search_finds_indexed_document(client):
    r = client.post("/search", json={"query": "Which document is about the glacier?", "top_k": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert hits[0]["doc_id"] == "doc-9"
    assert len({h["doc_id"] for h in hits}) == len(hits)  # one entry per document
    assert {"score", "chunk_index", "char_span", "token_span", "payload"} <= set(hits[0])
    # a filter on record metadata
    de = client.post("/search", json={"query": "glacier", "top_k": 5, "filter": {"meta.lang": "de"}}).json()["data"]
    assert de and all(h["payload"]["meta"]["lang"] == "de" for h in de)


def test_hybrid_finds_rare_term(client):
    for mode in ("hybrid", "sparse"):
        r = client.post("/search", json={"query": "zyxovian", "top_k": 3, "mode": mode})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["doc_id"] == "doc-4", mode


def test_auth(server, client):
    body = {"input": "hi"}
    assert httpx.post(f"{server}/v1/embeddings", json=body).status_code == 401
    wrong = httpx.post(f"{server}/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert client.post("/v1/embeddings", json=body).status_code == 200
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "all-MiniLM-L6-v2" and card["dimensions"] == 384 and card["max_tokens"] == 64
    health = httpx.get(f"{server}/healthz")  # no key needed; liveness only
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz")  # no key needed
    assert ready.status_code == 200 and ready.json()["store"]["points"] > 0


@pytest.mark.parametrize(
    "route,body,status",
    [
        ("/v1/embeddings", {"input": []}, 422),
        ("/v1/embeddings", {"input": ""}, 422),
        ("/v1/embeddings", {"input": "  "}, 422),
        ("/v1/embeddings", {"input": 5}, 422),
        ("/v1/embeddings", {"input": [1, "a"]}, 422),  # mixed lists
        ("/v1/embeddings", {"input": ["a", 1]}, 422),
        ("/v1/embeddings", {"input": [[1], "a"]}, 422),
        ("/v1/embeddings", {"input": [-1]}, 422),  # token ids are >= 0
        ("/v1/embeddings", {"input": [[]]}, 422),
        ("/v1/embeddings", {"input": [1.5]}, 422),
        ("/v1/embeddings", {"input": [10**9]}, 422),  # beyond the vocabulary
        ("/v1/embeddings", {"input": "a", "input_type": "passage"}, 422),
        ("/v1/embeddings", {"input": "a", "instruction": "Find"}, 422),  # instructions are for queries
        ("/embed", {"inputs": "a", "input_type": "document", "instruction": "Find"}, 422),
        ("/embed", {"inputs": "a", "normalize": False, "encoding_format": "uint8"}, 422),
        ("/embed", {"inputs": [[1]] * 9}, 413),
        ("/embed", {"inputs": [[1] * 5001]}, 413),
        ("/v1/embeddings", {"input": ["a", None]}, 422),
        ("/v1/embeddings", {}, 422),
        ("/v1/embeddings", [1, 2], 422),
        ("/v1/embeddings", {"input": "a", "encoding_format": "int4"}, 422),
        ("/v1/embeddings", {"input": "a", "dimensions": 10_000}, 422),
        ("/v1/embeddings", {"input": "a", "dimensions": 0}, 422),
        ("/v1/embeddings", {"input": ["a"] * 9}, 413),
        ("/v1/embeddings", {"input": "x" * 6000}, 413),
        ("/v1/embeddings", {"input": ["word"] * 5000}, 413),  # body over max_body_bytes
        ("/embed", {"inputs": "a", "normalize": "yes"}, 422),
        ("/search", {"query": ""}, 422),
        ("/search", {"query": "a", "top_k": 0}, 422),
        ("/search", {"query": "a", "mode": "fuzzy"}, 422),
        ("/search", {"query": "a", "filter": "lang=en"}, 422),
        ("/search", {"query": "a", "top_k": 1000}, 422),
        # filter values the store cannot take: caught by the request schema, before any Qdrant call
        ("/search", {"query": "a", "filter": {"meta.lang": ["en", 1]}}, 422),  # MatchAny: one type only
        ("/search", {"query": "a", "filter": {"meta.lang": [True, False]}}, 422),
        ("/search", {"query": "a", "filter": {"meta.n": 2**70}}, 422),  # beyond Qdrant's int64
        ("/search", {"query": "a", "filter": {"": "x"}}, 422),
        ("/search", {"query": "a", "filter": {"meta": {"lang": "en"}}}, 422),
        ("/search", {"query": "a", "filter": {"meta.lang": 1.5}}, 422),
        ("/search", {"query": "a", "instruction": "x" * 6000}, 413),
        ("/embed", {"inputs": "a", "instruction": "x" * 6000}, 413),
        ("/v1/embeddings", {"input": "a", "dimensions": 10**30}, 422),
    ],
)
def test_bad_inputs_are_4xx_json(client, route, body, status):
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["request_id"] == r.headers["x-request-id"]


def content_ids(embedder, texts: list[str]) -> list[list[int]]:
    """The served model's token ids of `texts`, without special tokens (what a client tokenising itself sends)."""
    return [embedder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_token_ids_embed_like_text(client, embedder):
    texts = ["The castle stands on the hill.", "A short one."]
    want = embedder.encode_documents(texts)
    ids = content_ids(embedder, texts)
    batch = client.post("/v1/embeddings", json={"input": ids})
    assert batch.status_code == 200, batch.text
    np.testing.assert_allclose([d["embedding"] for d in batch.json()["data"]], want, atol=1e-5)
    one = client.post("/v1/embeddings", json={"input": ids[0]})  # a flat list is one tokenised input
    assert len(one.json()["data"]) == 1
    np.testing.assert_allclose(one.json()["data"][0]["embedding"], want[0], atol=1e-5)
    text_usage = client.post("/v1/embeddings", json={"input": texts}).json()["usage"]
    assert batch.json()["usage"] == text_usage  # the same tokens, special tokens included
    query = client.post("/embed", json={"inputs": ids[:1], "instruction": "Find a place"})
    np.testing.assert_allclose(query.json()[0], embedder.encode_queries(texts[:1], instruction="Find a place")[0],
                               atol=1e-5)
    oov = client.post("/v1/embeddings", json={"input": [[1, 2], [5, 30522]]})
    assert oov.status_code == 422 and oov.json()["error"]["code"] == "invalid_token_ids"


def test_input_type(client, embedder):
    q = client.post("/v1/embeddings", json={"input": ["castle"], "input_type": "query"}).json()
    np.testing.assert_allclose(q["data"][0]["embedding"], embedder.encode_queries(["castle"])[0], atol=1e-5)
    qi = client.post("/v1/embeddings", json={"input": "castle", "input_type": "query", "instruction": "Find a place"})
    np.testing.assert_allclose(qi.json()["data"][0]["embedding"],
                               embedder.encode_queries(["castle"], instruction="Find a place")[0], atol=1e-5)
    e = client.post("/embed", json={"inputs": "castle", "input_type": "query"}).json()
    np.testing.assert_allclose(e[0], embedder.encode_queries(["castle"])[0], atol=1e-5)
    d = client.post("/embed", json={"inputs": "castle", "input_type": "document"}).json()
    np.testing.assert_allclose(d[0], embedder.encode_documents(["castle"])[0], atol=1e-5)


def assert_codes_match(got: list, want: list, fmt: str) -> None:
    """Served codes equal local ones up to float noise: an int8 coordinate at a rounding edge may move by one
    step, a coordinate at 0 may flip one sign bit."""
    got, want = np.array(got, dtype=np.int64), np.array(want, dtype=np.int64)
    if fmt.endswith("int8"):
        assert np.abs(got - want).max() <= 1, fmt
    else:
        offset = 128 if fmt == "binary" else 0
        bits = [np.unpackbits((x + offset).astype(np.uint8), axis=-1) for x in (got, want)]
        assert (bits[0] != bits[1]).sum(axis=-1).max() <= 1, fmt


def test_quantized_formats(client, embedder):
    from diffembed.serving import quantize

    texts = ["The castle stands on the hill.", "A short one."]
    full = embedder.encode_documents(texts)
    short = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    for fmt in ("int8", "uint8", "binary", "ubinary"):
        got = client.post("/v1/embeddings", json={"input": texts, "encoding_format": fmt}).json()["data"]
        assert_codes_match([row["embedding"] for row in got], quantize.encode(full, fmt), fmt)
        assert len(got[0]["embedding"]) == (384 if fmt.endswith("int8") else 48)
        tei = client.post("/embed", json={"inputs": texts, "encoding_format": fmt, "dimensions": 64}).json()
        assert len(tei[0]) == (64 if fmt.endswith("int8") else 8)
        assert_codes_match(tei, quantize.encode(short, fmt), fmt)
    b64 = client.post("/embed", json={"inputs": texts, "encoding_format": "base64"}).json()
    np.testing.assert_allclose(np.stack([np.frombuffer(base64.b64decode(s), "<f4") for s in b64]), full, atol=1e-5)


LONG_INSTRUCTION = "Find the passage that best answers this question about " + "word " * 70  # > max_length 64


@pytest.mark.parametrize("mode", ["dense", "hybrid", "sparse"])
def test_filter_rejected_by_the_store_is_422(client, mode):
    """A filter path Qdrant cannot parse reaches the store (local mode raises ValueError, a server 400): the
    retriever classifies it as the caller's error, not as an unavailable store."""
    r = client.post("/search", json={"query": "glacier", "mode": mode, "filter": {"meta[": "x"}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_search"
    assert error["message"].startswith("the store rejected the search")
    assert client.post("/search", json={"query": "glacier", "mode": mode}).status_code == 200  # store still fine


@pytest.mark.parametrize(
    "route,body",
    [
        ("/embed", {"inputs": ["castle"], "instruction": LONG_INSTRUCTION}),
        ("/search", {"query": "castle", "instruction": LONG_INSTRUCTION}),  # encoder error raised in the retriever
        ("/search", {"query": "castle", "mode": "hybrid", "instruction": LONG_INSTRUCTION}),
    ],
)
def test_instruction_leaving_no_query_tokens_is_422(client, route, body):
    r = client.post(route, json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_input"
    assert "no tokens left after the instruction" in error["message"]
    assert "Traceback" not in error["message"] and "\n" not in error["message"]


def test_deeply_nested_json_is_400(client):
    r = client.post("/v1/embeddings", content=b"[" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/search", content=b'{"query": "a", "filter": {"k": ' + b"[" * 500 + b"]" * 500 + b"}}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_body"


def test_invalid_json_and_unknown_route(client):
    r = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/embeddings", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/embeddings", content=b'{"input": "a lone \\ud800 surrogate"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    pair = client.post("/v1/embeddings", content=b'{"input": "an emoji \\ud83d\\ude00 is fine"}',
                       headers={"content-type": "application/json"})
    assert pair.status_code == 200, pair.text
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_reconfigure_retunes_batching(client):
    from ray import serve

    handle = serve.get_deployment_handle("Encoder", app_name="diffembed")
    settings = handle.batch_settings.remote().result(timeout_s=30)
    assert settings == {"max_batch_tokens": 4096, "batch_wait_timeout_s": 0.005}
    # what a user_config change calls on every replica
    handle.reconfigure.remote({"max_batch_tokens": 2048, "batch_wait_timeout_s": 0.001}).result(timeout_s=30)
    assert handle.batch_settings.remote().result(timeout_s=30) == {"max_batch_tokens": 2048,
                                                                   "batch_wait_timeout_s": 0.001}
    assert client.post("/embed", json={"inputs": ["still works"]}).status_code == 200
    handle.reconfigure.remote({"max_batch_tokens": 4096, "batch_wait_timeout_s": 0.005}).result(timeout_s=30)


def running_encoders() -> int:
    from ray import serve

    status = serve.status().applications["diffembed"].deployments["Encoder"]
    return status.replica_states.get("RUNNING", 0)


def test_autoscaling_under_load(server):
    """Concurrent load on the encoder: Serve goes from 1 to 2 replicas (num_cpus 0.5 each)."""
    assert running_encoders() == 1
    stop = threading.Event()
    body = {"input": ["some text to embed under load, long enough to take a while " * 4] * 8}

    def worker():
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            while not stop.is_set():
                c.post("/v1/embeddings", json=body)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while running_encoders() < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert running_encoders() == 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)


@pytest.mark.parametrize("name", ["config.yaml", "config_gpu.yaml"])
def test_shipped_serve_configs_validate(name, monkeypatch):
    import yaml

    from diffembed.serving.app import app_builder

    monkeypatch.setenv("DIFFEMBED_API_KEY", "from-env")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "serve" / name).read_text())["applications"][0]
    assert spec["import_path"] == "diffembed.serving.app:app_builder"
    args = ServeArgs.model_validate(spec["args"])
    assert args.api_key == "from-env" and args.store is not None
    assert (args.encoder.num_gpus == 1) == (name == "config_gpu.yaml")
    app_builder(args)  # builds the deployment graph without starting anything


def test_a_model_that_is_not_there_fails_the_build_in_one_line(tmp_path):
    """Serve calls the builder once (`serve run`/`deploy` in its build task): a missing or damaged model stops the
    app there with the job's one-line error, instead of every replica failing with a traceback, retried."""
    from diffembed.config import ConfigError
    from diffembed.serving.app import build_app

    with pytest.raises(ConfigError, match=f"^model not found: no checkpoint directory at {tmp_path}/nope$"):
        build_app({"embedder": {"model": str(tmp_path / "nope")}})
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text("{}")
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="model.safetensors: unreadable safetensors weights .* damaged or incomplete"):
        build_app({"embedder": {"model": str(tmp_path / "damaged")}, "store": None})


def test_search_documents_widens_until_top_k_documents(tmp_path):
    """A document whose many chunks fill the first point list does not crowd the others out: the search widens
    until it has top_k documents (Serve's /search and the evaluation rank through it), each document once, at its
    best chunk, and a filter holds in every round. Real Qdrant Edge."""
    from diffembed.index.config import StoreConfig
    from diffembed.index.store import ChunkRecord, open_store, search_documents

    rng = np.random.default_rng(0)
    query = rng.standard_normal(16).astype(np.float32)
    query /= np.linalg.norm(query)

    def near(similarity: float) -> np.ndarray:  # a unit vector at this cosine to the query
        other = rng.standard_normal(16).astype(np.float32)
        other -= (other @ query) * query
        return (similarity * query + np.sqrt(1 - similarity**2) * other / np.linalg.norm(other)).astype(np.float32)

    records = [ChunkRecord("long", i, 60, near(0.99 - i * 1e-4), (i, i + 1), (i, i + 1), metadata={"lang": "en"})
               for i in range(60)]  # 60 chunks, every one closer to the query than any other document
    records += [ChunkRecord(d, 0, 1, near(sim), (0, 1), (0, 1), metadata={"lang": lang})
                for d, sim, lang in [("b", 0.8, "en"), ("c", 0.7, "de"), ("d", 0.6, "en")]]
    with open_store(StoreConfig(path=str(tmp_path / "q"), collection="widen")) as store:
        store.ensure_collection(16)
        store.upsert(records)
        ranked = search_documents(store, query, None, top_k=3)  # 12 points first: all of them "long"'s
        assert [(h.doc_id, h.chunk_index) for h, _ in ranked] == [("long", 0), ("b", 0), ("c", 0)]
        assert [round(score, 3) for _, score in ranked] == [0.99, 0.8, 0.7]
        ranked = search_documents(store, query, None, top_k=3, filter={"meta.lang": "en"})
        assert [h.doc_id for h, _ in ranked] == ["long", "b", "d"]
