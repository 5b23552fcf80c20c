"""`make demo`: the batch-embedding job on the embedded default, then search, over the stdlib's documentation.

Why this corpus: it is real, varied text that every machine already has, so the demo needs no network, no
download and no data files, yet its answers are easy to judge ("compress a file with gzip" should find
`gzip`). One document per public function/class (docstring) and per module (module docstring) goes through
the real job (`embed_corpus`: local Ray Data, the packaged all-MiniLM-L6-v2 on CPU, Qdrant local mode with
BM25 sparse vectors); then the Ray Serve application (encoder + retriever + HTTP ingress) starts on the same
collection, typed queries are sent to `POST /search` over HTTP, the hits printed (best chunk per document),
and the demo's own local Ray instance is shut down with Serve in it. Running it again is idempotent: documents
already in the collection are skipped.

    .venv/bin/python jobs/demo.py "parse command line arguments" "send an email" --top-k 5 --limit 1000
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged model is local; nothing comes from the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from diffembed import Embedder, EmbedderConfig  # noqa: E402
from diffembed.documents import best_hits  # noqa: E402
from diffembed.index.store import open_store  # noqa: E402

MODULES = """
    abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections concurrent.futures
    configparser contextlib copy cProfile csv dataclasses datetime decimal difflib dis doctest email
    email.message enum fnmatch fractions ftplib functools getpass gettext glob graphlib gzip hashlib heapq
    hmac html html.parser http.client http.server imaplib importlib inspect io ipaddress itertools json
    locale logging lzma mailbox math mimetypes multiprocessing operator os os.path pathlib pickle
    platform pprint queue random re sched secrets shelve shlex shutil signal smtplib socket sqlite3
    ssl statistics string struct subprocess sys tarfile tempfile textwrap threading time timeit tokenize
    traceback typing unicodedata unittest urllib.parse urllib.request uuid warnings weakref xml.etree.ElementTree
    zipfile zlib
""".split()
DEFAULT_QUERIES = [
    "parse command line arguments",
    "compress a file with gzip",
    "run a shell command and capture its output",
    "compute a SHA-256 hash of bytes",
    "read rows from a CSV file",
]
MAX_CHARS = 1500


def summary(doc: object) -> str:
    """The docstring's leading paragraphs, up to MAX_CHARS, whitespace folded; '' when there is none."""
    if not isinstance(doc, str):
        return ""
    kept: list[str] = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        text = " ".join(paragraph.split())
        if kept and len(" ".join(kept)) + len(text) + 1 > MAX_CHARS:
            break
        if text:
            kept.append(text)
    return " ".join(kept)[:MAX_CHARS]


def defined_here(name: str, obj: object, module: ModuleType) -> bool:
    """Defined in the module, its package or its C accelerator (`csv.reader` lives in `_csv`), or exported
    in its `__all__` (`os.listdir` lives in `posix`)."""
    origin = getattr(obj, "__module__", None) or ""
    top = module.__name__.split(".")[0]
    return origin.split(".")[0] in {top, "_" + top} or name in getattr(module, "__all__", ())


# What the batch job embeds with and Serve serves with (one point per window; a document scores as its best).
DEMO_EMBEDDER = {"model": "all-MiniLM-L6-v2", "documents": {"windows": "best"}}


def stdlib_documents(limit: int) -> list[tuple[str, str, str]]:
    """(id, text, module) triples; modules take turns, so a small `limit` still covers every one."""
    per_module: list[list[tuple[str, str, str]]] = []
    seen: set[str] = set()
    for name in sorted(MODULES):
        with warnings.catch_warnings():  # deprecated modules and aliases (typing.io) warn on access
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:  # missing optional modules (e.g. no _ssl) are simply left out
                continue
            docs = [(name, summary(module.__doc__))]
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if defined_here(attr, obj, module):
                    docs.append((f"{name}.{attr}", summary(obj.__doc__)))
        kept = [(i, f"{i}: {t}", name) for i, t in docs if t and i not in seen]
        seen.update(i for i, _, _ in kept)
        per_module.append(kept)
    picked: list[tuple[str, str, str]] = []
    for rank in range(max((len(d) for d in per_module), default=0)):
        for group in per_module:
            if rank < len(group) and len(picked) < limit:
                picked.append(group[rank])
    return sorted(picked)


def shorten(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queries", nargs="*", help=f"what to search for (default: {len(DEFAULT_QUERIES)} examples)")
    parser.add_argument("--top-k", type=positive, default=3, help="hits per query (default: 3)")
    parser.add_argument("--limit", type=positive, default=2500, help="most documents to encode (default: 2500)")
    parser.add_argument("--workdir", default="out/demo", help="corpus file and Qdrant data (default: out/demo)")
    parser.add_argument("--no-serve", action="store_true", help="query Qdrant in-process instead of over HTTP")
    args = parser.parse_args(argv)
    queries: list[str] = args.queries or DEFAULT_QUERIES
    try:
        embedder = Embedder(EmbedderConfig())
        query_vectors = embedder.encode_queries(queries)  # first: bad queries fail before the long part
        corpus = stdlib_documents(args.limit)
        if not corpus:
            raise ValueError("no documented standard-library modules could be imported")
        import ray

        # Its own local instance (never a `ray start` cluster it might find): the embedded store's path is on
        # this machine, and shutting the instance down at the end takes Serve with it.
        ray.init(address="local")
        summary, cfg = index_corpus(corpus, Path(args.workdir))
    except ValueError as exc:  # ConfigError is a ValueError; both carry one readable line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    modules = {module for _, _, module in corpus}
    print(
        f"{len(corpus)} documents ({len(modules)} stdlib modules) encoded in {summary['wall_s']:.1f} s by the "
        f"embed_corpus job: {summary['documents_embedded']} embedded now ({summary['chunks_written']} chunks), "
        f"{summary['documents_already_present']} already in Qdrant Edge collection '{cfg.store.collection}' at {cfg.store.path}; "
        f"{embedder.config.model} on {embedder.device}, {embedder.dimension} dims"
    )
    if args.no_serve:
        with open_store(cfg.store) as store:
            for query, vector in zip(queries, query_vectors):
                hits = store.search(vector, query, top_k=args.top_k * 5, mode="dense")
                print_hits(query, [  # each document's best chunk
                    {"doc_id": h.doc_id, "score": h.score, "chunk_index": h.chunk_index, "payload": h.payload}
                    for h in best_hits(hits, args.top_k)
                ])
        return 0
    serve_and_query(cfg, queries, args.top_k)
    return 0


def print_hits(query: str, hits: list[dict]) -> None:
    print(f"\nquery: {query}")
    for rank, hit in enumerate(hits, 1):
        text = str((hit.get("payload") or {}).get("text") or "").removeprefix(f"{hit['doc_id']}: ")
        where = f" [chunk {hit['chunk_index']}]" if hit.get("chunk_index") else ""
        print(f"  {rank}. {hit['score']:.3f}  {hit['doc_id']}:{where} {shorten(text, 90)}")


def serve_and_query(cfg, queries: list[str], top_k: int) -> None:
    """Start the Serve application on the same collection, ask it over HTTP, shut it down."""
    import json
    import socket
    import urllib.request

    from ray import serve

    from diffembed.serving.app import app_builder
    from diffembed.serving.config import ServeArgs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the collection's own embedding function: Serve refuses a collection another function embedded
    args = ServeArgs.from_dict({"embedder": cfg.embedder.model_dump(mode="json", exclude_unset=True),
                                "store": cfg.store.model_dump(mode="json")})
    try:
        serve.run(app_builder(args), name="demo", route_prefix="/", blocking=False)
        while True:  # /readyz answers 503 until encoder, retriever and Qdrant are ready
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > 180:
                raise RuntimeError("the Serve application did not become healthy within 180 s")
            time.sleep(1)
        print(f"\nRay Serve application up at {base} after {time.perf_counter() - started:.0f} s; "
              f"asking POST /search over HTTP")
        for query in queries:
            request = urllib.request.Request(
                f"{base}/search", data=json.dumps({"query": query, "top_k": top_k, "mode": "dense"}).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                print_hits(query, json.loads(response.read())["data"])
    finally:
        # ray.shutdown() ends the demo's local instance, Serve's controller, proxy and replicas included.
        # serve.shutdown() first would only add a `Task ServeController.graceful_shutdown failed` line from the
        # raylet (Ray 2.60's controller is killed while that call waits, by design, and the retry is logged).
        import ray

        ray.shutdown()


def index_corpus(corpus: list[tuple[str, str, str]], workdir: Path):
    """Write the documents as JSONL and run the batch job on them (local Ray, local Qdrant)."""
    import json

    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "stdlib_docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t, "module": m}) + "\n" for i, t, m in corpus))
    cfg = EmbedCorpusConfig.from_dict({
        "embedder": DEMO_EMBEDDER,
        "input": {"paths": [str(path)], "metadata_columns": ["module"]},
        "encode": {"batch_size": 128},
        "store": {"path": str(workdir / "qdrant"), "collection": "stdlib", "sparse": True},
    })
    return embed_corpus(cfg, progress=False), cfg


if __name__ == "__main__":
    sys.exit(main())
