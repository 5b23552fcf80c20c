"""BEIR-layout retrieval datasets: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

corpus.jsonl rows are `{"_id", "title", "text"}` (text and title kept apart: the embedder's document policy
joins them, the same way for evaluation, the batch job and serving), queries.jsonl rows `{"_id", "text"}`, and the qrels TSV has a `query-id corpus-id score`
header. Queries with no relevant (score > 0) judgement in the split are dropped, as BEIR does. Anything
malformed is a `ConfigError` naming the file (and line). The folder may be a URI (`s3://…`, `file://…`): files
are opened through `diffembed.files`, like every other input.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffembed.config import ConfigError
from diffembed.documents import document_fields
from diffembed.files import is_dir, is_file, is_uri, join, json_lines, list_files, open_input


@dataclass
class RetrievalData:
    """A retrieval task in memory: documents, the judged queries, and their relevance judgements."""

    name: str
    corpus: dict[str, str]  # doc id -> text
    queries: dict[str, str]  # query id -> text (only queries with a relevant document)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade
    meta: dict[str, Any] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # doc id -> title, for documents that have one


def _open_text(path: str | Path):
    return io.TextIOWrapper(open_input(str(path)), encoding="utf-8")


def _jsonl(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    if not is_file(str(path)):
        raise ConfigError(f"{what} file not found: {path}")
    rows = []
    with _open_text(path) as f:
        for number, row in json_lines(f):
            if isinstance(row, ValueError):
                raise ConfigError(f"{path}:{number}: {row}")
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if row.get("_id") in (None, ""):
                raise ConfigError(f"{path}:{number}: missing '_id'")
            rows.append((number, row))
    return rows


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def read_corpus(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(doc id -> text, doc id -> title for the documents that have one)."""
    corpus: dict[str, str] = {}
    titles: dict[str, str] = {}
    for number, row in _jsonl(path, "corpus"):
        doc_id, where = str(row["_id"]), f"{path}:{number}"
        if doc_id in corpus:
            raise ConfigError(f"{where}: duplicate _id {doc_id!r}")
        text, title = document_fields(_text(row, "text", where), _text(row, "title", where))  # the batch job's rule
        corpus[doc_id] = text
        if title:
            titles[doc_id] = title
    if not corpus:
        raise ConfigError(f"{path}: no documents")
    return corpus, titles


def read_queries(path: str | Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for number, row in _jsonl(path, "queries"):
        query_id, where = str(row["_id"]), f"{path}:{number}"
        if query_id in queries:
            raise ConfigError(f"{where}: duplicate _id {query_id!r}")
        text = _text(row, "text", where).strip()
        if not text:
            raise ConfigError(f"{where}: query {query_id!r} has no text")
        queries[query_id] = text
    if not queries:
        raise ConfigError(f"{path}: no queries")
    return queries


def available_splits(root: str | Path) -> list[str]:
    qrels_dir = join(str(root), "qrels")
    if not is_dir(qrels_dir):
        return []
    base = qrels_dir.split("?", 1)[0].rstrip("/") + "/"
    names = (f.split("?", 1)[0].removeprefix(base) for f in list_files(qrels_dir, (".tsv",)))
    return sorted(n.removesuffix(".tsv") for n in names if "/" not in n)  # qrels/<split>.tsv, not deeper


def read_qrels(path: str | Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            where = f"{path}:{number}"
            if len(parts) == 4:  # TREC qrels: query-id iteration doc-id score
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise ConfigError(f"{where}: expected 'query-id corpus-id score', got {len(parts)} columns")
            query_id, doc_id, raw = (p.strip() for p in parts)
            try:
                grade = float(raw)
            except ValueError:
                if number == 1:  # the header
                    continue
                raise ConfigError(f"{where}: score {raw!r} is not a number") from None
            if grade != int(grade):
                raise ConfigError(f"{where}: score {raw!r} is not an integer grade")
            if query_id not in queries:
                raise ConfigError(f"{where}: query id {query_id!r} is not in queries.jsonl")
            if doc_id not in corpus:
                raise ConfigError(f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
            qrels.setdefault(query_id, {})[doc_id] = int(grade)
    return qrels


def load_beir(path: str | Path, split: str = "test", name: str | None = None, max_queries: int | None = None,
              corpus: tuple[dict[str, str], dict[str, str]] | None = None) -> RetrievalData:
    """Read a BEIR-layout dataset; only queries with a relevant document in `split` are kept. `corpus`: the
    folder's (texts, titles) from an earlier `load_beir` of another split, shared instead of read again."""
    root = str(path) if is_uri(str(path)) else str(Path(path).expanduser())
    if not is_dir(root):
        raise ConfigError(f"BEIR dataset folder not found: {root}")
    qrels_path = join(root, "qrels", f"{split}.tsv")
    if not is_file(qrels_path):
        splits = available_splits(root)
        have = ", ".join(splits) if splits else f"none: {join(root, 'qrels')} holds no .tsv files"
        raise ConfigError(f"{root}: no split {split!r} (available: {have})")
    corpus, titles = corpus or read_corpus(join(root, "corpus.jsonl"))
    queries = read_queries(join(root, "queries.jsonl"))
    qrels = read_qrels(qrels_path, queries, corpus)
    judged = [q for q in queries if any(grade > 0 for grade in qrels.get(q, {}).values())]
    if not judged:
        raise ConfigError(f"{qrels_path}: no query has a relevant document in split {split!r}")
    if max_queries is not None:
        judged = judged[:max_queries]
    return RetrievalData(
        name=name or root.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1],
        corpus=corpus,
        queries={q: queries[q] for q in judged},
        qrels={q: qrels[q] for q in judged},
        meta={"path": root, "split": split, "queries_in_file": len(queries)},
        titles=titles,
    )
