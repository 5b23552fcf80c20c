"""Corpus reading with Ray Data: files or globs or a folder -> rows {doc_id, text, title, meta, skip}.

JSONL is parsed here (not by pyarrow's reader) so a malformed line is reported as `file:line`. Rows that
cannot be embedded (empty or non-text) are kept with a `skip` reason, so the job counts and reports them
instead of dropping them silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from diffembed.batch.config import InputConfig
from diffembed.config import ConfigError
from diffembed.files import decode_lines, expand_files, json_lines

TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ConfigError):
    """A corpus file that cannot be read; the message names the file (and line)."""


def expand_inputs(cfg: InputConfig) -> tuple[str, list[str]]:
    """(format, files). Local globs and folders are expanded and checked; URIs are passed to Ray Data."""
    files: list[str] = []
    for pattern in cfg.paths:
        if "://" in pattern:
            files.append(pattern)
            continue
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ConfigError(f"input folder {path} holds no .txt or .md files")
            files.extend(found)
            continue
        files.extend(expand_files([pattern], "input.paths"))
    fmt = cfg.format
    if fmt == "auto":
        kinds = {_kind(f) for f in files}
        if len(kinds) != 1:
            raise ConfigError(f"inputs mix formats {sorted(kinds)}; set input.format")
        fmt = kinds.pop()
    for f in files:
        if "://" not in f and not Path(f).is_file():
            raise ConfigError(f"input is not a readable file: {f}")
    return fmt, files


def _kind(path: str) -> str:
    if path.endswith((".parquet", ".pq")):
        return "parquet"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    return "jsonl"


def check_columns(cfg: InputConfig, fmt: str, files: list[str]) -> None:
    """Unknown columns are an error before anything runs (checked on the first file's schema)."""
    if fmt == "text":
        return
    first = files[0]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        columns = set(pq.read_schema(first).names)
    else:
        columns = set()
        with _open(first) as f:
            for number, record in json_lines(f):
                if isinstance(record, ValueError):
                    raise CorpusError(f"{first}:{number}: {record}")
                columns = set(record) if isinstance(record, dict) else set()
                break
    wanted = [cfg.text_column, *([cfg.title_column] if cfg.title_column else []), *cfg.metadata_columns]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ConfigError(f"{first}: unknown column(s) {missing}; the file has {sorted(columns)}")


def _open(path: str):
    if "://" in path:
        import pyarrow.fs as pafs
        import io

        fs, p = pafs.FileSystem.from_uri(path)
        return io.TextIOWrapper(fs.open_input_stream(p), encoding="utf-8")
    return open(path, encoding="utf-8")


def content_id(text: str) -> str:
    return "sha1-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def normalize(row: dict[str, Any], cfg: InputConfig, where: str) -> dict[str, Any]:
    text = row.get(cfg.text_column)
    skip = ""
    if not isinstance(text, str):
        skip, text = f"non-text {cfg.text_column!r} ({type(text).__name__})", ""
    elif not text.strip():
        skip = "empty text"
    raw_id = row.get(cfg.id_column) if cfg.id_column else None
    doc_id = str(raw_id) if raw_id not in (None, "") else content_id(text)
    title = row.get(cfg.title_column) if cfg.title_column else None
    meta = {c: row.get(c) for c in cfg.metadata_columns}
    return {
        "doc_id": doc_id,
        "text": text,
        "title": title if isinstance(title, str) else None,
        "meta": json.dumps(meta, default=str),
        "skip": skip,
        "where": where,
    }


def read_corpus(cfg: InputConfig):
    """A Ray Dataset of normalized document rows (lazy: nothing is read until the pipeline runs)."""
    import ray.data

    fmt, files = expand_inputs(cfg)
    check_columns(cfg, fmt, files)
    if fmt == "parquet":
        ds = ray.data.read_parquet(files, include_paths=True)
        return ds.map(lambda row: normalize(row, cfg, row.get("path", "")))
    raw = ray.data.read_binary_files(files, include_paths=True)
    if fmt == "text":
        root = os.path.dirname(os.path.commonpath(files)) if len(files) == 1 else os.path.commonpath(files)
        return raw.map(lambda row: _text_row(row, cfg, root))
    return raw.flat_map(lambda row: _jsonl_rows(row, cfg))


def _text_row(row: dict[str, Any], cfg: InputConfig, root: str) -> dict[str, Any]:
    """One document per file; its id is the path relative to the input folder."""
    path = row["path"]
    try:
        text = row["bytes"].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    doc = {"id": os.path.relpath(path, root) if root else path, "text": text}
    return normalize(doc, cfg.model_copy(update={"id_column": "id", "text_column": "text"}), path)


def _jsonl_rows(row: dict[str, Any], cfg: InputConfig) -> list[dict[str, Any]]:
    path = row["path"]
    out = []
    for number, record in json_lines(decode_lines(row["bytes"])):
        if isinstance(record, ValueError):
            raise CorpusError(f"{path}:{number}: {record}")
        if not isinstance(record, dict):
            record = {}
        out.append(normalize(record, cfg, f"{path}:{number}"))
    return out
