"""BEIR-layout retrieval datasets: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

corpus.jsonl rows are `{"_id", "title", "text"}` (text and title kept apart: the embedder's document policy
joins them, the same way for evaluation, the batch job and serving), queries.jsonl rows `{"_id", "text"}`, and the qrels TSV has a `query-id corpus-id score`
header. Queries with no relevant (score > 0) judgement in the split are dropped, as BEIR does. Anything
malformed is a `ConfigError` naming the file (and line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffembed.config import ConfigError
from diffembed.files import json_lines


@dataclass
class RetrievalData:
    """A retrieval task in memory: documents, the judged queries, and their relevance judgements."""

    name: str
    corpus: dict[str, str]  # doc id -> text
    queries: dict[str, str]  # query id -> text (only queries with a relevant document)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade
    meta: dict[str, Any] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # doc id -> title, for documents that have one


def _jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
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


def read_corpus(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(doc id -> text, doc id -> title for the documents that have one)."""
    corpus: dict[str, str] = {}
    titles: dict[str, str] = {}
    for number, row in _jsonl(path, "corpus"):
        doc_id, where = str(row["_id"]), f"{path}:{number}"
        if doc_id in corpus:
            raise ConfigError(f"{where}: duplicate _id {doc_id!r}")
        title, text = _text(row, "title", where).strip(), _text(row, "text", where).strip()
        if title and not text:  # a title-only document: its title is its text
            title, text = "", title
        corpus[doc_id] = text
        if title:
            titles[doc_id] = title
    if not corpus:
        raise ConfigError(f"{path}: no documents")
    return corpus, titles


def read_queries(path: Path) -> dict[str, str]:
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


def available_splits(root: Path) -> list[str]:
    qrels_dir = root / "qrels"
    return sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
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


def load_beir(path: str | Path, split: str = "test", name: str | None = None,
              max_queries: int | None = None) -> RetrievalData:
    """Read a BEIR-layout dataset; only queries with a relevant document in `split` are kept."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"BEIR dataset folder not found: {root}")
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = available_splits(root)
        have = ", ".join(splits) if splits else f"none: {root / 'qrels'} holds no .tsv files"
        raise ConfigError(f"{root}: no split {split!r} (available: {have})")
    corpus, titles = read_corpus(root / "corpus.jsonl")
    queries = read_queries(root / "queries.jsonl")
    qrels = read_qrels(qrels_path, queries, corpus)
    judged = [q for q in queries if any(grade > 0 for grade in qrels.get(q, {}).values())]
    if not judged:
        raise ConfigError(f"{qrels_path}: no query has a relevant document in split {split!r}")
    if max_queries is not None:
        judged = judged[:max_queries]
    return RetrievalData(
        name=name or root.name,
        corpus=corpus,
        queries={q: queries[q] for q in judged},
        qrels={q: qrels[q] for q in judged},
        meta={"path": str(root), "split": split, "queries_in_file": len(queries)},
        titles=titles,
    )
