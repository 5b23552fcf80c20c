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
    """A retrieval task in memory: documents, the judged queries, and their relevance judgements.

    Read without texts (`load_beir(texts=False)`, the store backend's way at any corpus size), `corpus` is None and
    only the ids of the documents with text are held; the batch job then reads the documents itself from
    `batch_input` (the corpus file and its columns)."""

    name: str
    corpus: dict[str, str] | None  # doc id -> text; None when the texts were not read
    queries: dict[str, str]  # query id -> text (only queries with a relevant document)
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade
    meta: dict[str, Any] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)  # doc id -> title, for documents that have one
    text_ids: list[str] = field(default_factory=list)  # the documents that have text (retrievable), in corpus order
    size: int = 0  # documents in the corpus, with text or without
    batch_input: dict[str, Any] | None = None  # BEIR: the batch job's `input` that reads exactly these documents

    def __post_init__(self) -> None:
        if self.corpus is not None and not self.size:  # built from texts (load_beir passes both)
            self.text_ids = [d for d, text in self.corpus.items() if text.strip()]
            self.size = len(self.corpus)


@dataclass
class BeirCorpus:
    """A BEIR folder's corpus.jsonl as read: with its texts, or (`texts=False`) only its ids, so a corpus of
    millions of documents is checked without being held. Shared by the splits read from it (`load_beir`)."""

    path: str
    texts: dict[str, str] | None  # doc id -> text, when read with texts
    titles: dict[str, str]
    ids: set[str] | dict[str, str]  # every doc id (the qrels are checked against it)
    text_ids: list[str]
    columns: set[str]  # the first row's keys: the batch job checks its columns against them
    any_title: bool

    def batch_input(self) -> dict[str, Any] | None:
        """The batch job's `input` reading the same documents as this reader, or None when none does: the job
        requires its text and title columns in the first row (a typo guard), BEIR only `_id`."""
        if "text" not in self.columns or (self.any_title and "title" not in self.columns):
            return None
        return {"paths": [self.path], "format": "jsonl", "id_column": "_id", "text_column": "text",
                "title_column": "title" if "title" in self.columns else None, "bad_rows": "skip"}


def _open_text(path: str | Path):
    return io.TextIOWrapper(open_input(str(path)), encoding="utf-8")


def _jsonl(path: str | Path, what: str):
    """(line number, row) of a JSONL file, streamed; a malformed line or a row without `_id` is a ConfigError."""
    if not is_file(str(path)):
        raise ConfigError(f"{what} file not found: {path}")
    with _open_text(path) as f:
        for number, row in json_lines(f):
            if isinstance(row, ValueError):
                raise ConfigError(f"{path}:{number}: {row}")
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if row.get("_id") in (None, ""):
                raise ConfigError(f"{path}:{number}: missing '_id'")
            yield number, row


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def read_beir_corpus(path: str | Path, texts: bool = True) -> BeirCorpus:
    """Read and check a corpus.jsonl (unique `_id`s, string text and title); `texts=False` keeps only the ids."""
    kept: dict[str, str] = {}
    ids: set[str] = set()
    titles: dict[str, str] = {}
    text_ids: list[str] = []
    columns: set[str] | None = None
    any_title = False
    for number, row in _jsonl(path, "corpus"):
        doc_id, where = str(row["_id"]), f"{path}:{number}"
        if columns is None:
            columns = set(row)
        if doc_id in (kept if texts else ids):
            raise ConfigError(f"{where}: duplicate _id {doc_id!r}")
        text, title = document_fields(_text(row, "text", where), _text(row, "title", where))  # the batch job's rule
        any_title = any_title or bool(title)
        if texts:
            kept[doc_id] = text
            if title:
                titles[doc_id] = title
        else:
            ids.add(doc_id)
        if text:
            text_ids.append(doc_id)
    if columns is None:
        raise ConfigError(f"{path}: no documents")
    return BeirCorpus(path=str(path), texts=kept if texts else None, titles=titles, ids=kept if texts else ids,
                      text_ids=text_ids, columns=columns, any_title=any_title)


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


def read_qrels(path: str | Path, queries: dict[str, str], corpus: set[str] | dict[str, str]
               ) -> dict[str, dict[str, int]]:
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
              corpus: BeirCorpus | None = None, texts: bool = True) -> RetrievalData:
    """Read a BEIR-layout dataset; only queries with a relevant document in `split` are kept. `corpus`: the
    folder's corpus from `read_beir_corpus` (or an earlier split), shared instead of read again; `texts=False`
    reads it without holding its texts (see `RetrievalData`)."""
    root = beir_root(path)
    qrels_path = split_qrels(root, split)
    if corpus is None:
        corpus = read_beir_corpus(join(root, "corpus.jsonl"), texts=texts)
    queries = read_queries(join(root, "queries.jsonl"))
    qrels = read_qrels(qrels_path, queries, corpus.ids)
    judged = [q for q in queries if any(grade > 0 for grade in qrels.get(q, {}).values())]
    if not judged:
        raise ConfigError(f"{qrels_path}: no query has a relevant document in split {split!r}")
    if max_queries is not None:
        judged = judged[:max_queries]
    return RetrievalData(
        name=name or root.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1],
        corpus=corpus.texts,
        queries={q: queries[q] for q in judged},
        qrels={q: qrels[q] for q in judged},
        meta={"path": root, "split": split, "queries_in_file": len(queries)},
        titles=corpus.titles,
        text_ids=corpus.text_ids,
        size=len(corpus.ids),
        batch_input=corpus.batch_input(),
    )


def beir_root(path: str | Path) -> str:
    """The dataset folder (a local path or URI), checked to exist."""
    root = str(path) if is_uri(str(path)) else str(Path(path).expanduser())
    if not is_dir(root):
        raise ConfigError(f"BEIR dataset folder not found: {root}")
    return root


def split_qrels(root: str, split: str) -> str:
    """The split's qrels file in a dataset folder; a ConfigError naming the splits there if it has none."""
    qrels_path = join(root, "qrels", f"{split}.tsv")
    if not is_file(qrels_path):
        splits = available_splits(root)
        have = ", ".join(splits) if splits else f"none: {join(root, 'qrels')} holds no .tsv files"
        raise ConfigError(f"{root}: no split {split!r} (available: {have})")
    return qrels_path
