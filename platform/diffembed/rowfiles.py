"""Rows of JSONL / Parquet input files (training pairs, pairs to mine negatives for), read and checked on the
cluster, every bad row named `file:row`.

`scan_rows` reads the files whole in Ray tasks (one per file, any pyarrow filesystem) and runs a row check; the
checked rows stay in Ray's object store as Arrow tables. The driver gets each good row's place (block, offset) in input order,
a few small columns it asks for, and the bad rows' reasons: never the rows' text. `file_rows` reads one file in this
process (small files: dev sets, tests).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from diffembed.config import ConfigError
from diffembed.files import decode_lines, json_lines, open_input

log = logging.getLogger(__name__)

# A row check returns the row's columns (a dict of plain values) or the reason it is bad.
RowCheck = Callable[[Any], "dict[str, Any] | str"]


@dataclass
class BadRows:
    count: int = 0
    examples: list[str] = field(default_factory=list)  # "file:row: reason", the first few

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


def file_kind(path: str, fmt: str) -> str:
    path = path.split("?", 1)[0] if "://" in path else path  # a URI's ?endpoint_override=… is not its suffix
    return fmt if fmt != "auto" else ("parquet" if path.endswith((".parquet", ".pq")) else "jsonl")


def parse_rows(data: bytes, kind: str, path: str) -> Iterator[tuple[int, Any]]:
    """(row number from 1, parsed row or an Exception) for every row of a file's bytes; ConfigError for a file
    that is not Parquet at all (one line, not pyarrow's context)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:
            raise ConfigError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    yield from json_lines(decode_lines(data))


def file_rows(path: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """A local file's or a URI's rows, read in this process (s3://, gs://, file://: `open_input` resolves them)."""
    try:
        with open_input(path) as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    yield from parse_rows(data, file_kind(path, fmt), path)


def checked(path: str, rows: Iterator[tuple[int, Any]], check: RowCheck) -> Iterator[tuple[str, dict | str]]:
    """(`file:row`, the row's columns or why it is bad) for every row."""
    for number, row in rows:
        try:
            yield f"{path}:{number}", check(row)
        except ValueError as exc:
            yield f"{path}:{number}", str(exc)


def collect_bad(bad_rows: list[tuple[str, str]], policy: str, what: str = "bad training row", hint: str = ""
                ) -> BadRows:
    """The bad rows (`file:row`, reason), in input order, counted; ConfigError on the first when `policy` is
    `fail` (`<file:row>: <what>: <reason><hint>`)."""
    bad = BadRows()
    for where, reason in bad_rows:
        if policy == "fail":
            raise ConfigError(f"{where}: {what}: {reason}{hint}")
        bad.add(where, reason)
    if bad.count:
        log.warning("skipped %d bad rows; first: %s", bad.count, "; ".join(bad.examples[:3]))
    return bad


@dataclass
class ScannedRows:
    """Checked rows left in Ray's object store. `blocks` are object references to Arrow tables, one per file, holding the
    check's columns (bad rows are in them too, unreferenced); good row i in input order (file, row) is row
    `offset[i]` of `blocks[block[i]]`; `columns` holds the small columns the driver asked for, per good row."""

    blocks: list[Any]
    block: np.ndarray  # (N,) int32
    offset: np.ndarray  # (N,) int64
    columns: dict[str, list[Any]]
    bad: BadRows

    def __len__(self) -> int:
        return len(self.block)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) arrays of the same shape as `positions` (good-row numbers in input order)."""
        return self.block[positions], self.offset[positions]

    def blocks_in_order(self) -> list[Any]:
        """The blocks holding good rows, in input order (one block per file, in the order the files were given)."""
        return [self.blocks[b] for b in np.unique(self.block).tolist()]


def take_rows(blocks: list[Any], block: np.ndarray, offset: np.ndarray, column: str) -> list[Any]:
    """`column` of row `offset[i]` of `blocks[block[i]]`, in that order; one block is fetched at a time (a local
    block is mapped from Ray's object store without a copy) and dropped before the next."""
    import ray

    block, offset = np.asarray(block).ravel(), np.asarray(offset).ravel()
    values: list[Any] = [None] * len(block)
    order = np.argsort(block, kind="stable")  # the rows grouped by block
    cuts = np.flatnonzero(np.diff(block[order])) + 1
    for where in np.split(order, cuts) if len(order) else []:
        taken = ray.get(blocks[int(block[where[0]])]).column(column).take(offset[where]).to_pylist()
        for i, value in zip(where.tolist(), taken):
            values[i] = value
    return values


def scan_rows(files: list[str], fmt: str, check: RowCheck, bad_rows: str, keep: tuple[str, ...] = (),
              what: str = "bad training row", hint: str = "") -> ScannedRows:
    """Read and `check` every row of `files` in Ray tasks, one per file; returns the good rows' places and their
    `keep` columns. The rows stay in Ray's object store (each task's Arrow table); a lost one is rebuilt by Ray's
    lineage reconstruction (the file is read again).

    Files are read whole so every bad row keeps its file and row number. A table holds the check's columns (a bad
    row's are null) and `_reason`, why the row is bad (null for a good row).
    """
    import ray

    scan = ray.remote(num_cpus=1)(_scan_file).options(num_returns=2)
    refs = [scan.remote(path, fmt, check, keep) for path in files]
    blocks = [table for table, _ in refs]
    places = ray.get([place for _, place in refs])  # one per file, in the order given: rows come in input order
    fatal = [reason for p in places for reason in p[3]]
    if fatal:
        raise ConfigError(fatal[0])
    block = np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(places)])
    offset = np.concatenate([p[0] for p in places])
    bad = collect_bad([b for p in places for b in p[2]], bad_rows, what, hint)
    if not len(block):
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    return ScannedRows(blocks=blocks, block=block, offset=offset,
                       columns={name: [v for p in places for v in p[1][name]] for name in keep}, bad=bad)


def _scan_file(path: str, fmt: str, check: RowCheck, keep: tuple[str, ...]):
    """One file's rows as an Arrow table (stays in the object store) and its places (to the driver): the good rows'
    offsets in the table and `keep` columns, the bad rows as (where, reason), the reason the file is unreadable
    if it is; all in row order."""
    import pyarrow as pa

    try:
        items = list(checked(path, file_rows(path, fmt), check))
    except ConfigError as exc:  # the whole file is unreadable: fatal, whatever `bad_rows` says
        return pa.table({}), (np.zeros(0, np.int64), {k: [] for k in keep}, [], [str(exc)])
    rows = [{"_reason": None, **item} if isinstance(item, dict) else {"_reason": item} for _, item in items]
    names = list(dict.fromkeys(name for row in rows for name in row))  # every row's columns, nulls where missing
    table = pa.table({name: [row.get(name) for row in rows] for name in names}) if rows else pa.table({})
    offsets = np.flatnonzero([row["_reason"] is None for row in rows]).astype(np.int64)
    bad = [(where, item) for where, item in items if not isinstance(item, dict)]
    return table, (offsets, {k: [rows[i][k] for i in offsets.tolist()] for k in keep}, bad, [])


def json_column(value: Any) -> str:
    """A row (or part of one) as a JSON string column value: Arrow needs one type per column across rows."""
    return json.dumps(value, ensure_ascii=False, default=str)
