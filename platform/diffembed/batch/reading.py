"""Corpus reading with Ray Data: files or globs or a folder -> rows {doc_id, text, title, meta, skip, where}.

JSONL is parsed here (not by pyarrow's reader) so a malformed line is reported as `file:line`. A JSONL file is
read as byte ranges of `input.block_bytes` (each range owns the lines that start in it), so a single 50 GB
file streams through the pipeline in bounded blocks and the first points are written while the rest is still
being read. Rows that cannot be embedded (empty or non-text) are kept with a `skip` reason, so the job counts
and reports them instead of dropping them silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from diffembed.batch.config import InputConfig
from diffembed.config import ConfigError
from diffembed.files import expand_files, json_lines

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
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8")


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
    if fmt == "text":
        raw = ray.data.read_binary_files(files, include_paths=True)
        root = os.path.dirname(os.path.commonpath(files)) if len(files) == 1 else os.path.commonpath(files)
        return raw.map(lambda row: _text_row(row, cfg, root))
    ranges = plan_ranges(files, cfg.block_bytes)
    return ray.data.from_items(ranges, override_num_blocks=len(ranges)).flat_map(lambda item: _range_rows(item, cfg))


def _size(path: str) -> int:
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(p).size
    return os.path.getsize(path)


def plan_ranges(files: list[str], block_bytes: int) -> list[dict[str, Any]]:
    """Byte ranges of at most `block_bytes` over every file, in file order (an empty file: no range)."""
    ranges = []
    for path in files:
        size = _size(path)
        for start in range(0, size, block_bytes):
            ranges.append({"path": path, "start": start, "end": min(start + block_bytes, size)})
    return ranges


def _open_binary(path: str):
    """A seekable binary file with `readline`, local or any pyarrow URI (s3://, gs://, file://)."""
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        return io.BufferedReader(fs.open_input_file(p))  # pyarrow's own readline is not implemented
    return open(path, "rb")


def line_number(path: str, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset` (counted only when a report needs it)."""
    count, done = 1, 0
    with _open_binary(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def iter_range_lines(path: str, start: int, end: int):
    """(byte offset, line bytes) of the lines that start in [start, end)."""
    with _open_binary(path) as f:
        pos = start
        if start > 0:  # the line running into this range belongs to the previous one
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        else:
            f.seek(0)
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def _range_rows(item: dict[str, Any], cfg: InputConfig) -> list[dict[str, Any]]:
    path = item["path"]
    out = []
    for offset, raw in iter_range_lines(path, item["start"], item["end"]):
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{line_number(path, offset)}: malformed JSON line ({exc.msg})") from None
        if not isinstance(record, dict):
            record = {}
        out.append(normalize(record, cfg, f"{path}@{offset}"))
    return out


def where_to_line(where: str) -> str:
    """`file@byte` (as rows carry it) -> `file:line` for a report; other forms are returned as they are."""
    path, sep, offset = where.rpartition("@")
    if not sep or not offset.isdigit():
        return where
    try:
        return f"{path}:{line_number(path, int(offset))}"
    except OSError:
        return where


def _text_row(row: dict[str, Any], cfg: InputConfig, root: str) -> dict[str, Any]:
    """One document per file; its id is the path relative to the input folder."""
    path = row["path"]
    try:
        text = row["bytes"].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    doc = {"id": os.path.relpath(path, root) if root else path, "text": text}
    return normalize(doc, cfg.model_copy(update={"id_column": "id", "text_column": "text"}), path)
