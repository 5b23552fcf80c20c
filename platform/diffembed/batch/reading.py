"""Corpus reading with Ray Data: files or globs or a folder -> rows {doc_id, text, title, meta, skip, where}.

JSONL is parsed here (not by pyarrow's reader) so a malformed line is reported as `file:line`. A JSONL file is
read as byte ranges of `input.block_bytes` (each range owns the lines that start in it), so a single 50 GB
file streams through the pipeline in bounded blocks and the first points are written while the rest is still
being read. Parquet files are read by row group and text folders in groups of files, so every format is a
list of small *units* (`plan_units`) parsed by one function (`unit_rows`), both by the job and by its pre-pass
over ids (`diffembed.batch.scan`). Every row carries its input position (`order`: file index << 40 | byte offset
or row number), which makes "the last occurrence of an id" well defined whatever the scheduling. Rows that
cannot be embedded (malformed JSON, empty or non-text) are kept with a `skip` reason, so the job counts and
reports them (or, with `input.bad_rows=fail`, stops on the first) instead of dropping them silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

from diffembed.batch.config import InputConfig
from diffembed.config import ConfigError
from diffembed.documents import document_fields
from diffembed.files import (GLOB_CHARS, expand_files, file_size, is_dir, iter_range_lines, json_lines, line_number,
                             list_files, open_input, plan_ranges)

TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ConfigError):
    """A corpus file that cannot be read; the message names the file (and line)."""


def expand_inputs(cfg: InputConfig) -> tuple[str, list[str]]:
    """(format, files). Globs and folders (local or URIs: s3://, gs://, file://) are expanded and every file
    checked to exist here, before anything runs; URIs stay URIs."""
    files: list[str] = []
    for pattern in cfg.paths:
        if not any(c in pattern for c in GLOB_CHARS) and is_dir(pattern):
            found = list_files(pattern, TEXT_SUFFIXES)
            if not found:
                raise ConfigError(f"input folder {pattern} holds no .txt or .md files")
            files.extend(found)
            continue
        files.extend(expand_files([pattern], "input.paths", folders=False))
    fmt = cfg.format
    if fmt == "auto":
        kinds = {_kind(f) for f in files}
        if len(kinds) != 1:
            raise ConfigError(f"inputs mix formats {sorted(kinds)}; set input.format")
        fmt = kinds.pop()
    return fmt, files


def _kind(path: str) -> str:
    path = path.split("?", 1)[0] if "://" in path else path  # a URI's ?endpoint_override=… is not its suffix
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

        with open_input(first) as f:
            columns = set(pq.read_schema(f).names)
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
    return io.TextIOWrapper(open_input(path), encoding="utf-8")


def content_id(text: str) -> str:
    return "sha1-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


ORDER_BITS = 40  # a row's position: file index << 40 | byte offset (JSONL), row number (Parquet) or 0 (text)


def normalize(row: dict[str, Any], cfg: InputConfig, where: str, order: int = 0, weight: int = 1,
              skip: str = "") -> dict[str, Any]:
    """One document row; `weight` is its share of the input (bytes, or 1 row) for the progress ETA."""
    raw = row.get(cfg.text_column)
    raw = "" if raw is None else raw  # a null or missing text is no text (the row may still have a title), as in BEIR
    title = row.get(cfg.title_column) if cfg.title_column else None
    title = title if isinstance(title, str) else None
    text = ""
    if skip:
        title = None
    elif not isinstance(raw, str):
        skip, title = f"non-text {cfg.text_column!r} ({type(raw).__name__})", None
    else:
        text, title = document_fields(raw, title)  # the one rule: stripped; a title-only row is its title
        if not text:
            skip = "empty text"
    raw_id = row.get(cfg.id_column) if cfg.id_column else None
    # a row without an id is named by its text as given (ids of earlier runs stay), or by its title if it has none
    named_by = raw if isinstance(raw, str) and raw.strip() else text
    doc_id = str(raw_id) if raw_id not in (None, "") else content_id(named_by)
    meta = {c: row.get(c) for c in cfg.metadata_columns}
    return {
        "doc_id": doc_id,
        "text": text,
        "title": title,
        "meta": json.dumps(meta, default=str),
        "skip": skip,
        "where": where,
        "order": order,
        "weight": weight,
    }


def read_corpus(cfg: InputConfig, units: list[dict[str, Any]] | None = None):
    """A Ray Dataset of normalized document rows (lazy: nothing is read until the pipeline runs), one block per
    unit. Rows at the positions a unit lists under `drop` (duplicate ids, see `diffembed.batch.scan`) come out
    skipped with reason DUPLICATE."""
    import ray.data

    from diffembed.placement import where_to_read

    if units is None:
        units = plan_units(cfg)
    blocks = max(1, len(units))  # empty files only: an empty dataset
    return ray.data.from_items(units, override_num_blocks=blocks).flat_map(
        lambda unit: list(unit_rows(unit, cfg)), **where_to_read(unit_files(units).values()))  # local files: here


DUPLICATE = "__duplicate_id__"  # the skip reason of a row whose id occurs again later in the input


def plan_units(cfg: InputConfig) -> list[dict[str, Any]]:
    """Check the inputs and cut them into units of bounded size, in input order: JSONL byte ranges, Parquet
    row groups, groups of text files. Each unit knows its file index (`file`) and its `weight` in the input."""
    fmt, files = expand_inputs(cfg)
    check_columns(cfg, fmt, files)
    if fmt == "jsonl":
        return [{**r, "format": fmt, "weight": r["end"] - r["start"]} for r in plan_ranges(files, cfg.block_bytes)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        units = []
        for index, path in enumerate(files):
            with open_input(path) as f:
                meta = pq.ParquetFile(f).metadata
            first = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                units.append({"format": fmt, "path": path, "file": index, "row_group": group, "first_row": first,
                              "weight": rows})
                first += rows
        return units
    root = os.path.dirname(os.path.commonpath(files)) if len(files) == 1 else os.path.commonpath(files)
    units, group, size = [], [], 0
    for index, path in enumerate(files):  # a few hundred small files per unit, not one block per file
        group.append([index, path])
        size += file_size(path)
        if size >= cfg.block_bytes or len(group) >= 256:
            units.append({"format": fmt, "files": group, "root": root, "file": group[0][0], "weight": len(group)})
            group, size = [], 0
    if group:
        units.append({"format": fmt, "files": group, "root": root, "file": group[0][0], "weight": len(group)})
    return units


def unit_start(unit: dict[str, Any]) -> int:
    """The smallest position a unit's rows can have (units are planned in increasing order)."""
    offset = unit.get("start", unit.get("first_row", 0))
    return (unit["file"] << ORDER_BITS) | offset


def unit_rows(unit: dict[str, Any], cfg: InputConfig):
    """The normalized rows of one unit, in input order; duplicates the unit lists under `drop` are marked."""
    drop = set(unit.get("drop", ()))
    if unit["format"] == "jsonl":
        rows = _range_rows(unit, cfg)
    elif unit["format"] == "parquet":
        rows = _parquet_rows(unit, cfg)
    else:
        one_text = cfg.model_copy(update={"id_column": "id", "text_column": "text", "title_column": None,
                                          "metadata_columns": []})
        rows = (_text_row(path, one_text, unit["root"], index) for index, path in unit["files"])
    for row in rows:
        if drop and row["order"] in drop and not row["skip"]:
            row.update(skip=DUPLICATE, text="")
        yield row


def unit_files(units: list[dict[str, Any]]) -> dict[int, str]:
    """The input files by index (the high bits of a row's `order`), as the units name them."""
    files: dict[int, str] = {}
    for unit in units:
        if "files" in unit:
            files.update((index, path) for index, path in unit["files"])
        else:
            files[unit["file"]] = unit["path"]
    return files


def position(unit_format: str, files: dict[int, str] | list[str], order: int) -> str:
    """A row's `order` as a report names it: file:line (JSONL), file:row N (Parquet), the file (text)."""
    path, offset = files[order >> ORDER_BITS], order & ((1 << ORDER_BITS) - 1)
    if unit_format == "jsonl":
        return where_to_line(f"{path}@{offset}")
    if unit_format == "parquet":
        return f"{path}:row {offset + 1}"
    return path


def _range_rows(item: dict[str, Any], cfg: InputConfig):
    """The rows of the lines starting in one byte range; a malformed line is a row skipped with its reason."""
    path, base = item["path"], item.get("file", 0) << ORDER_BITS
    for offset, raw in iter_range_lines(path, item["start"], item["end"]):
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            continue
        skip = ""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            record, skip = {}, f"malformed JSON line ({exc.msg})"
        if not isinstance(record, dict) and not skip:
            record, skip = {}, f"not a JSON object ({type(record).__name__})"
        yield normalize(record, cfg, f"{path}@{offset}", base | offset, len(raw), skip)


def _parquet_rows(unit: dict[str, Any], cfg: InputConfig):
    import pyarrow.parquet as pq

    path = unit["path"]
    wanted = {c for c in (cfg.id_column, cfg.text_column, cfg.title_column, *cfg.metadata_columns) if c}
    with open_input(path) as f:
        pf = pq.ParquetFile(f)
        table = pf.read_row_group(unit["row_group"], columns=[c for c in pf.schema_arrow.names if c in wanted])
    base = (unit["file"] << ORDER_BITS) | unit["first_row"]
    for i, record in enumerate(table.to_pylist()):
        yield normalize(record, cfg, f"{path}:row {unit['first_row'] + i + 1}", base + i)


def where_to_line(where: str) -> str:
    """`file@byte` (as rows carry it) -> `file:line` for a report; other forms are returned as they are."""
    path, sep, offset = where.rpartition("@")
    if not sep or not offset.isdigit():
        return where
    try:
        return f"{path}:{line_number(path, int(offset))}"
    except OSError:
        return where


def _text_row(path: str, cfg: InputConfig, root: str, index: int) -> dict[str, Any]:
    """One document per file; its id is the path relative to the input folder. `cfg` reads columns id and text."""
    with open_input(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    doc = {"id": os.path.relpath(path, root) if root else path, "text": text}
    return normalize(doc, cfg, path, index << ORDER_BITS, 1)
