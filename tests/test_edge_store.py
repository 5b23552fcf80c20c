"""The embedded Qdrant Edge store under stress: a writer killed mid-load, a second process, damaged or foreign
store folders, and a re-embed with another embedding function. Real Qdrant Edge, real processes, no mocks.

Child processes run small scripts with this interpreter (the project's venv); CLI runs connect to the session's
Ray instance (`ray_cluster`) instead of starting their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffembed.config import ConfigError
from diffembed.index.config import StoreConfig
from diffembed.index.edge import EdgeStore
from diffembed.index.sparse import SPARSE_VECTOR_NAME, document_vector
from diffembed.index.store import ChunkRecord, StoreBusy, StoreError, point_id, point_payload

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PY = sys.executable
JOB = [PY, str(ROOT / "jobs" / "embed_corpus.py"), "--config", str(ROOT / "jobs" / "configs" / "embed_cpu.yaml")]
MINILM_DIM = 384  # so the CLI gets past the dimension check to the store itself

DIM = 16  # the durability test's vectors
BATCH = 500  # points per acknowledged upsert
BATCHES = 30  # the writer's whole load (15000 points); it is killed after KILL_AFTER acknowledged batches
KILL_AFTER = 4
WORDS = "river mountain forest harbour castle library market garden bridge tower valley meadow".split()


def batch_records(batch: int, size: int = BATCH, dim: int = DIM) -> list[ChunkRecord]:
    """Batch `batch` of the durability load: the same records, vectors included, in every process."""
    rng = np.random.default_rng(1000 + batch)
    vectors = rng.standard_normal((size, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit length: cosine stores them as given
    return [
        ChunkRecord(
            doc_id=f"b{batch}-d{i // 2}", chunk_index=i % 2, n_chunks=2, vector=vectors[i],
            token_span=(i, i + 7), char_span=(3 * i, 3 * i + 40),
            text=f"record{batch}x{i} the {WORDS[i % len(WORDS)]} by the {WORDS[(batch + i) % len(WORDS)]}",
            title=f"Batch {batch}", metadata={"batch": batch, "i": i},
        )
        for i in range(size)
    ]


# argv: store path, collection, batches. Prints `acked <n>` once each upsert of BATCH points has returned.
WRITER = """
import sys
sys.path.insert(0, {tests!r})
from {module} import BATCH, DIM, batch_records
from diffembed.index.config import StoreConfig
from diffembed.index.edge import EdgeStore

path, collection, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
# 100 points per Edge update: a kill inside upsert() can leave part of its batch written.
with EdgeStore(StoreConfig(path=path, collection=collection, sparse=True, upsert_batch_size=100)) as store:
    store.ensure_collection(DIM)
    with store.bulk_load():
        records = batch_records(0)
        for b in range(batches):
            store.upsert(records)
            records = batch_records(b + 1)  # made before the ack, so the kill lands inside the next upsert()
            print(f"acked {{(b + 1) * BATCH}}", flush=True)
print("done", flush=True)
""".format(tests=str(TESTS), module=Path(__file__).stem)

# argv: store path, collection. Opens the shard, prints `ready <count>`, holds it until stdin closes.
HOLDER = """
import sys
from diffembed.index.config import StoreConfig
from diffembed.index.edge import EdgeStore

store = EdgeStore(StoreConfig(path=sys.argv[1], collection=sys.argv[2], sparse=True))
print(f"ready {store.count()}", flush=True)
sys.stdin.read()
store.close()
"""

# argv: pairs of (store path, collection). One JSON line per pair: what count() did.
PROBE = """
import json, sys
from diffembed.index.config import StoreConfig
from diffembed.index.edge import EdgeStore

args = sys.argv[1:]
for path, collection in zip(args[::2], args[1::2]):
    try:
        with EdgeStore(StoreConfig(path=path, collection=collection, sparse=True)) as store:
            out = {"count": store.count()}
    except Exception as exc:
        out = {"type": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


# -- helpers ----------------------------------------------------------------------------------------------


def edge(path: Path, collection: str = "docs", **settings: Any) -> EdgeStore:
    return EdgeStore(StoreConfig(path=str(path), collection=collection, sparse=True, **settings))


def points_of(path: Path, collection: str = "docs") -> dict[str, Any]:
    with edge(path, collection) as store:
        return {p.id: p for batch in store.iter_points(batch_size=1024) for p in batch}


def small_collection(path: Path, dim: int = MINILM_DIM, n: int = 6, collection: str = "docs") -> None:
    with edge(path, collection) as store:
        store.ensure_collection(dim)
        store.upsert(batch_records(0, size=n, dim=dim))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (or `root` itself) -> digest of its contents: "nothing was written" checks."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def one_line_store_error(exc: BaseException, kind: type = StoreError) -> str:
    assert isinstance(exc, kind), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message and "panicked" not in message, message
    return message


def raises_within(fn: Callable[[], Any], seconds: float = 10.0) -> BaseException:
    """The exception `fn` raises, which it must raise within `seconds` (a hang fails the test)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s instead of raising"
    assert "error" in box, f"returned {box.get('value')!r} instead of raising"
    return box["error"]


@contextmanager
def watchdog(proc: subprocess.Popen, seconds: float) -> Iterator[None]:
    """SIGKILL `proc` if the block is still running after `seconds` (so reading its output cannot hang)."""
    timer = threading.Timer(seconds, lambda: proc.poll() is None and proc.kill())
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@contextmanager
def held(path: Path, collection: str = "docs") -> Iterator[subprocess.Popen]:
    """Another process with the collection open, until the block ends."""
    proc = subprocess.Popen([PY, "-c", HOLDER, str(path), collection], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with watchdog(proc, 120):
            line = proc.stdout.readline()
        assert line.startswith("ready"), f"holder did not open the store: {line!r} {proc.stderr.read()[-2000:]}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # the holder closes the store and exits
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def job_env() -> dict[str, str]:
    """The job joins this session's Ray instance (started by `ray_cluster`) instead of starting its own."""
    import ray

    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def job_args(corpus: Path, store_path: Path, collection: str = "docs") -> list[str]:
    return [*JOB, f"input.paths=[{corpus}]", f"store.path={store_path}", f"store.collection={collection}",
            "summary_path=null"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def tiny_jsonl(tmp_path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": f"the harbour lights number {i}", "title": "t"}) + "\n"
                            for i in range(3)))
    return path


# -- 1. durability ----------------------------------------------------------------------------------------


def test_acknowledged_points_survive_sigkill_and_the_rerun_completes(tmp_path):
    store_path = tmp_path / "edge"
    with open(tmp_path / "writer.err", "w") as err:
        writer = subprocess.Popen([PY, "-c", WRITER, str(store_path), "docs", str(BATCHES)], stdout=subprocess.PIPE,
                                  stderr=err, text=True)
    acked = 0
    with watchdog(writer, 180):
        for line in writer.stdout:
            if line.startswith("acked "):
                acked = int(line.split()[1])
                if acked >= KILL_AFTER * BATCH:
                    # Mid-stream, somewhere inside the next upsert(): about one batch's time of jitter, so runs
                    # also kill it inside Edge's own update (the assertions hold wherever it lands).
                    time.sleep(random.uniform(0, 0.08))
                    os.kill(writer.pid, signal.SIGKILL)
                    break
        for line in writer.stdout.read().splitlines():  # acknowledgements already in the pipe when it died
            if line.startswith("acked "):
                acked = max(acked, int(line.split()[1]))
        writer.wait()
    assert writer.returncode == -signal.SIGKILL, (writer.returncode, (tmp_path / "writer.err").read_text()[-2000:])
    assert KILL_AFTER * BATCH <= acked < BATCHES * BATCH, acked

    # Reopened by another process: the shard loads, every acknowledged point is there, exactly as written.
    with edge(store_path) as store:
        count = store.count()
    assert acked <= count <= acked + BATCH, (acked, count)
    points = points_of(store_path)
    assert len(points) == count
    acked_batches = acked // BATCH
    for b in range(acked_batches):
        for record in batch_records(b):
            pid = point_id("docs", record.doc_id, record.chunk_index)
            assert pid in points, f"acknowledged point {record.doc_id}/{record.chunk_index} lost"
            point = points[pid]
            np.testing.assert_allclose(np.asarray(point.vectors["dense"]), record.vector, rtol=0, atol=1e-6)
            assert point.payload == point_payload(record, store_text=True)
            bm25 = document_vector(record.text)
            indices, values = point.vectors[SPARSE_VECTOR_NAME]
            assert dict(zip(indices, np.float32(values))) == pytest.approx(dict(zip(bm25.indices, bm25.values)))
    in_flight = {point_id("docs", r.doc_id, r.chunk_index) for r in batch_records(acked_batches)}
    acked_ids = {point_id("docs", r.doc_id, r.chunk_index) for b in range(acked_batches) for r in batch_records(b)}
    assert set(points) - acked_ids <= in_flight  # beyond the acknowledged: only part of the batch in flight

    # The collection takes writes again: the same load rerun completes it, onto the same ids.
    rerun = subprocess.run([PY, "-c", WRITER, str(store_path), "docs", str(BATCHES)], capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.rstrip().endswith("done"), rerun.stderr[-2000:]
    final = points_of(store_path)
    expected = {point_id("docs", r.doc_id, r.chunk_index): r for b in range(BATCHES) for r in batch_records(b)}
    assert final.keys() == expected.keys()
    with edge(store_path) as store:
        assert store.count() == BATCHES * BATCH  # one point per id: nothing duplicated
        probe = batch_records(BATCHES - 1)[7]
        hits = store.search(probe.vector, None, top_k=1)
        assert hits[0].id == point_id("docs", probe.doc_id, probe.chunk_index) and hits[0].score > 0.999


# -- 2. one process per store -----------------------------------------------------------------------------


def test_second_process_gets_store_busy_and_nothing_is_damaged(tmp_path):
    store_path = tmp_path / "edge"
    small_collection(store_path)
    before = points_of(store_path)
    store_dir = str(store_path / "docs")
    with held(store_path) as holder:
        quick = {"lock_wait_s": 0.5}  # the default wait (5 s) once, then a shorter one: the same answer
        for name, call in [
            ("count", lambda: edge(store_path).count()),
            ("ensure_collection", lambda: edge(store_path, **quick).ensure_collection(MINILM_DIM)),
            ("search", lambda: edge(store_path, **quick).search(np.ones(MINILM_DIM, np.float32), None, top_k=1)),
            ("drop", lambda: edge(store_path, **quick).drop()),
        ]:
            message = one_line_store_error(raises_within(call, 10), StoreBusy)
            assert store_dir in message and "another process" in message, (name, message)
        assert (store_path / "docs" / "collection.json").is_file()  # drop deleted nothing under the holder
        assert holder.poll() is None
    assert holder.returncode == 0
    after = points_of(store_path)
    assert after.keys() == before.keys() and len(after) == 6
    assert all(after[k].payload == before[k].payload for k in before)


def test_job_against_a_busy_store_exits_2_with_one_line(ray_cluster, tmp_path, tiny_jsonl):
    store_path = tmp_path / "edge"
    small_collection(store_path)  # 384-dim, no fingerprint: the job gets past the collection checks to the lock
    before = points_of(store_path)
    with held(store_path) as holder:
        proc = subprocess.run(job_args(tiny_jsonl, store_path), capture_output=True, text=True, env=job_env(),
                              timeout=240)
        assert holder.poll() is None
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "another process" in errors[0] and str(store_path / "docs") in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert points_of(store_path).keys() == before.keys()


# -- 3. stores that cannot be used ------------------------------------------------------------------------


def test_store_path_that_is_a_file(tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    with pytest.raises(StoreError) as info:
        edge(path)
    message = one_line_store_error(info.value)
    assert str(path) in message and "is a file" in message
    assert path.read_text() == "x"


def newer_edge_collection(store_path: Path) -> None:
    small_collection(store_path)
    meta_path = store_path / "docs" / "collection.json"
    meta = json.loads(meta_path.read_text())
    meta["edge_version"] = "99.0.0"
    meta_path.write_text(json.dumps(meta))


def test_collection_written_by_a_newer_edge(tmp_path):
    store_path = tmp_path / "edge"
    newer_edge_collection(store_path)
    before = snapshot(store_path)
    for call in (lambda s: s.count(), lambda s: s.ensure_collection(MINILM_DIM),
                 lambda s: s.search(np.ones(MINILM_DIM, np.float32), None)):
        with pytest.raises(StoreError) as info:
            call(edge(store_path))
        message = one_line_store_error(info.value)
        assert "99.0.0" in message and "newer" in message and "'docs'" in message, message
    assert snapshot(store_path) == before  # refused before Edge touched the files


def garble(files: list[Path]) -> None:
    assert files, "nothing to garble: the shard layout changed"
    for f in files:
        f.write_bytes(b"\x00garbage\xff" * 8)


def blank(files: list[Path]) -> None:
    assert files, "nothing to empty: the shard layout changed"
    for f in files:
        f.write_bytes(b"")


def test_damaged_shard_is_a_readable_error_not_a_crash(tmp_path):
    cases = {  # name -> how the shard is damaged
        "segments": lambda shard: garble(list(shard.glob("segments/*/segment.json"))),
        "versions": lambda shard: blank(list(shard.glob("segments/*/version.info"))),
        "wal": lambda shard: garble([f for f in (shard / "wal").iterdir() if f.is_file()]),
        "config": lambda shard: garble([shard / "edge_config.json"]),
        "no-shard": shutil.rmtree,
    }
    args = []
    for name, damage in cases.items():
        small_collection(tmp_path / name, dim=DIM)
        damage(tmp_path / name / "docs" / "shard")
        args += [str(tmp_path / name), "docs"]
    # Another process: were Edge to panic or crash on these files, the test reports it instead of dying.
    proc = subprocess.run([PY, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(cases), proc.stdout
    for name, out in zip(cases, results):
        assert out.get("type") == "StoreError", (name, out)
        message = out["message"]
        assert "\n" not in message and "panicked" not in message, (name, message)
        assert message.startswith(f"cannot open collection 'docs' at {tmp_path / name / 'docs'}"), (name, message)


def test_job_refuses_unusable_stores_with_exit_2_and_writes_nothing(ray_cluster, tmp_path, tiny_jsonl):
    file_path = tmp_path / "a-file"
    file_path.write_text("x")
    newer = tmp_path / "newer"
    newer_edge_collection(newer)
    damaged = tmp_path / "damaged"
    small_collection(damaged)
    garble(list((damaged / "docs" / "shard").glob("segments/*/segment.json")))
    cases = {file_path: "is a file", newer: "99.0.0", damaged: "cannot open collection 'docs'"}
    before = {path: snapshot(path) for path in cases}
    env = job_env()
    procs = {path: subprocess.Popen(job_args(tiny_jsonl, path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env) for path in cases}  # side by side: each pays the imports
    for path, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        errors = error_lines(stderr)
        assert proc.returncode == 2 and len(errors) == 1, (path.name, proc.returncode, stderr[-3000:])
        assert cases[path] in errors[0] and "Traceback" not in stderr, (path.name, errors[0])
        assert snapshot(path) == before[path], f"{path.name}: the job changed the store"


def test_unfinished_collection_is_replaced(tmp_path):
    # A crash between creating the shard and writing collection.json (here: after a few points too).
    store_path = tmp_path / "edge"
    small_collection(store_path, dim=DIM)
    (store_path / "docs" / "collection.json").unlink()
    # ... and one that died inside Edge's own creation: a shard folder with a half-written file.
    partial = tmp_path / "partial"
    (partial / "docs" / "shard" / "segments").mkdir(parents=True)
    (partial / "docs" / "shard" / "edge_config.json").write_text('{"vectors": {"den')
    for path in (store_path, partial):
        store = edge(path)
        assert not store.exists()
        with pytest.raises(StoreError, match="does not exist"):
            store.count()
        with edge(path) as store:
            store.ensure_collection(DIM)
            assert store.count() == 0  # a fresh collection, nothing of the unfinished one
            records = batch_records(3, size=4)
            store.upsert(records)
            assert store.search(records[2].vector, None, top_k=1)[0].doc_id == records[2].doc_id
        meta = json.loads((path / "docs" / "collection.json").read_text())
        assert meta["size"] == DIM and meta["edge_version"]
        with edge(path) as store:
            assert store.count() == 4


def test_missing_collection_on_read(tmp_path):
    store_path = tmp_path / "edge"
    small_collection(store_path, dim=DIM, collection="other")
    nowhere = tmp_path / "nowhere"
    for path in (store_path, nowhere):
        store = edge(path, "ghost")
        assert not store.exists() and store.fingerprint() is None
        for call in (store.count, lambda: store.search(np.ones(DIM, np.float32), None),
                     lambda: next(store.iter_points()), lambda: store.complete_docs(["a"])):
            with pytest.raises(StoreError) as info:
                call()
            message = one_line_store_error(info.value)
            assert "'ghost'" in message and "does not exist" in message and str(path) in message, message
    assert not nowhere.exists()  # reading created nothing
    assert sorted(p.name for p in store_path.iterdir()) == ["other"]


def test_old_qdrant_client_local_store(tmp_path):
    from qdrant_client import QdrantClient, models

    store_path = tmp_path / "legacy"
    client = QdrantClient(path=str(store_path))
    client.create_collection("docs", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
    client.close()
    before = snapshot(store_path)
    for call in (lambda s: s.ensure_collection(DIM), lambda s: s.count(),
                 lambda s: s.search(np.ones(DIM, np.float32), None)):
        with pytest.raises(StoreError) as info:
            call(edge(store_path))
        message = one_line_store_error(info.value)
        assert "qdrant-client local-mode" in message and str(store_path) in message, message
    assert snapshot(store_path) == before  # left as it was, for qdrant-client


# -- 4. another embedding function --------------------------------------------------------------------------


def test_reembed_with_another_max_length_needs_recreate(ray_cluster, tmp_path):
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    corpus = tmp_path / "corpus.jsonl"
    long_text = " ".join(f"On day {j} the {WORDS[j % len(WORDS)]} was quiet." for j in range(20))  # ~180 tokens
    docs = [{"id": "long", "text": long_text, "title": "Long"},
            *({"id": f"short-{i}", "text": f"The {w} at dawn.", "title": None} for i, w in enumerate(WORDS[:3]))]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    store_path = tmp_path / "edge"

    def cfg(max_length: int, *overrides: str) -> EmbedCorpusConfig:
        return EmbedCorpusConfig.from_dict({
            "embedder": {"model": "all-MiniLM-L6-v2", "max_length": max_length,
                         "documents": {"windows": "best", "overlap": 8}},
            "input": {"paths": [str(corpus)], "title_column": "title"},
            "encode": {"actors": 1, "batch_size": 8},
            "store": {"path": str(store_path), "collection": "docs", "sparse": True},
        }, list(overrides))

    first = embed_corpus(cfg(128), progress=False)
    assert first["documents_embedded"] == 4
    before = points_of(store_path)
    assert len(before) == first["points_in_collection"]

    with pytest.raises(ConfigError) as info:  # same collection, another embedding function: refused
        embed_corpus(cfg(48), progress=False)
    message = str(info.value)
    assert "\n" not in message and "max_length (stored 128, now 48)" in message and "recreate=true" in message, message
    after = points_of(store_path)
    assert after.keys() == before.keys()
    assert all(after[k].payload == before[k].payload and after[k].vectors == before[k].vectors for k in before)

    second = embed_corpus(cfg(48, "recreate=true"), progress=False)
    assert second["documents_embedded"] == 4 and second["documents_already_present"] == 0
    with edge(store_path) as store:
        assert store.fingerprint()["function"]["max_length"] == 48
        assert store.count() == second["chunks_written"] == second["points_in_collection"]
        assert store.complete_docs([d["id"] for d in docs]) == {d["id"] for d in docs}
    final = points_of(store_path)
    long_points = [p.payload for p in final.values() if p.payload["doc_id"] == "long"]
    assert len(long_points) > sum(p.payload["doc_id"] == "long" for p in before.values())  # re-chunked at 48
    assert all(p["n_chunks"] == len(long_points) and p["token_end"] - p["token_start"] <= 48 for p in long_points)
