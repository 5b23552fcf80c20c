"""Rows of JSONL / Parquet input files (training pairs, pairs to mine negatives for), read and checked on the
cluster, every bad row named `file:row`.

`scan_rows` cuts the files into shards of bounded size (`plan_shards`: JSONL byte ranges, each owning the lines
that start in it; runs of Parquet row groups), reads and checks each shard in a Ray task and leaves the checked
rows in Ray's object store as Arrow tables: a single 50 GB file is read by many tasks at once, none of them
holding more than a shard. The driver gets each good row's place (block, offset) in input order, a few small
columns it asks for, and the bad rows' reasons: never the rows' text. `file_rows` reads one file in this process
(small files: dev sets, tests); both parse a JSONL line alike, so they name the same rows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from diffembed.config import ConfigError
from diffembed.files import iter_range_lines, json_lines, open_input, plan_ranges, utf8_lines

log = logging.getLogger(__name__)

# A row check returns the row's columns (a dict of plain values) or the reason it is bad.
RowCheck = Callable[[Any], "dict[str, Any] | str"]

SHARD_BYTES = 64 << 20  # a scan task's share of a file: a JSONL byte range, or Parquet row groups of about this size


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


def _parquet_file(f, path: str):
    """A ParquetFile, or one ConfigError line for a file that is not Parquet at all (not pyarrow's context)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def file_rows(path: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """(row number from 1, parsed row or an Exception) for every row of a local file or a URI (s3://, gs://,
    file://: `open_input` resolves them), read in this process."""
    try:
        with open_input(path) as f:
            if file_kind(path, fmt) == "parquet":
                rows = _parquet_file(f, path).read().to_pylist()
                yield from enumerate(rows, start=1)
            else:
                yield from json_lines(utf8_lines(f))  # a binary file iterates its lines split at b"\n"
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


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
    """Checked rows left in Ray's object store. `blocks` are object references to Arrow tables, one per shard in
    input order, holding the check's columns (bad rows are in them too, unreferenced); good row i in input order
    (file, row) is row `offset[i]` of `blocks[block[i]]`; `columns` holds the small columns the driver asked for,
    per good row."""

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
        """The blocks holding good rows, in input order (one per shard, files in the order they were given)."""
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


def plan_shards(files: list[str], fmt: str, shard_bytes: int = SHARD_BYTES) -> list[dict[str, Any]]:
    """The files cut into shards of about `shard_bytes`, in input order: a JSONL file's byte ranges (`start`,
    `end`; each owns the lines that start in it) or a Parquet file's runs of row groups (`row_groups`, and
    `first_row`, the file's row number of their first row, from 0). An empty file has none; a file that is not
    Parquet at all is a ConfigError here, before any task runs. Each file's size or Parquet footer is one request:
    they are made on threads, so ten thousand files on S3 take seconds, not the sum of their latencies."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(files)))) as pool:
        per_file = list(pool.map(lambda path: _file_shards(path, fmt, shard_bytes), files))  # in input order
    return [shard for shards in per_file for shard in shards]


def _file_shards(path: str, fmt: str, shard_bytes: int) -> list[dict[str, Any]]:
    if file_kind(path, fmt) == "jsonl":
        return [{"path": path, "kind": "jsonl", "start": r["start"], "end": r["end"]}
                for r in plan_ranges([path], shard_bytes)]
    try:
        with open_input(path) as f:
            meta = _parquet_file(f, path).metadata
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    shards, groups, size, first = [], [], 0, 0
    for g in range(meta.num_row_groups):
        if groups and size >= shard_bytes:
            shards.append({"path": path, "kind": "parquet", "row_groups": groups, "first_row": first})
            first += sum(meta.row_group(k).num_rows for k in groups)
            groups, size = [], 0
        groups.append(g)
        size += meta.row_group(g).total_byte_size
    if groups:
        shards.append({"path": path, "kind": "parquet", "row_groups": groups, "first_row": first})
    return shards


def scan_rows(files: list[str], fmt: str, check: RowCheck, bad_rows: str, keep: tuple[str, ...] = (),
              what: str = "bad training row", hint: str = "", shard_bytes: int = SHARD_BYTES) -> ScannedRows:
    """Read and `check` every row of `files` in Ray tasks, one per shard (`plan_shards`); returns the good rows'
    places and their `keep` columns. The rows stay in Ray's object store (each task's Arrow table); a lost one is
    rebuilt by Ray's lineage reconstruction (the shard is read again).

    A table holds the check's columns (a bad row's are null) and `_reason`, why the row is bad (null for a good
    row). A task names its rows by their number in the shard; the driver turns that into the file's row number
    from the shards before it (for JSONL, the lines they own, blank ones included), so a bad row is `file:row`
    exactly as `file_rows` numbers it.
    """
    import ray

    from diffembed.placement import where_to_read

    shards = plan_shards(files, fmt, shard_bytes)
    scan = ray.remote(num_cpus=1)(_scan_shard).options(num_returns=2, **where_to_read(files))  # local files: here
    refs = [scan.remote(shard, check, keep) for shard in shards]
    blocks = [table for table, _ in refs]
    places = ray.get([place for _, place in refs])  # one per shard, in input order: rows come in input order
    fatal = [p["fatal"] for p in places if p["fatal"]]
    if fatal:
        raise ConfigError(fatal[0])
    bad_found: list[tuple[str, str]] = []
    lines_before: dict[str, int] = {}  # JSONL: lines owned by the file's earlier shards
    for shard, p in zip(shards, places):
        if shard["kind"] == "jsonl":
            first = lines_before.get(shard["path"], 0)
            lines_before[shard["path"]] = first + p["rows"]
        else:
            first = shard["first_row"]
        bad_found += [(f"{shard['path']}:{first + number}", reason) for number, reason in p["bad"]]
    bad = collect_bad(bad_found, bad_rows, what, hint)
    block = np.concatenate([np.full(len(p["offsets"]), i, np.int32) for i, p in enumerate(places)] or
                           [np.zeros(0, np.int32)])
    offset = np.concatenate([p["offsets"] for p in places] or [np.zeros(0, np.int64)])
    if not len(block):
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    return ScannedRows(blocks=blocks, block=block, offset=offset,
                       columns={name: [v for p in places for v in p["keep"][name]] for name in keep}, bad=bad)


class _ShardRows:
    """Iterates (row number in the shard from 1, parsed row or an Exception) over a shard's rows, one at a time;
    afterwards `owned` is how many rows (JSONL: lines, blank ones included) the shard owns."""

    def __init__(self, shard: dict[str, Any]):
        self.shard, self.owned = shard, 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        shard, path = self.shard, self.shard["path"]
        if shard["kind"] == "jsonl":
            yield from json_lines(self._count(utf8_lines(raw for _, raw in iter_range_lines(path, shard["start"],
                                                                                          shard["end"]))))
            return
        with open_input(path) as f:
            table = _parquet_file(f, path).read_row_groups(shard["row_groups"])
        for batch in table.to_batches(max_chunksize=4096):
            yield from enumerate(self._count(batch.to_pylist()), start=self.owned + 1)

    def _count(self, items):
        for item in items:
            self.owned += 1
            yield item


def _scan_shard(shard: dict[str, Any], check: RowCheck, keep: tuple[str, ...]):
    """One shard's rows as an Arrow table (stays in the object store) and its places (to the driver): the good rows'
    offsets in the table and `keep` columns, the bad rows as (row number in the shard, reason), how many rows the
    shard owns, and why it is unreadable if it is; all in row order. Rows are parsed and checked one at a time:
    the task holds the checked columns and the table, not the parsed rows."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {"_reason": []}
    bad, count, rows = [], 0, _ShardRows(shard)
    try:
        for number, row in rows:
            try:
                values, reason = check(row), None
            except ValueError as exc:
                values, reason = {}, str(exc)
                bad.append((number, reason))
            for name in values:
                if name not in columns:  # a column first seen here: null in the rows before
                    columns[name] = [None] * count
            for name, column in columns.items():
                column.append(reason if name == "_reason" else values.get(name))
            count += 1
    except (ConfigError, OSError) as exc:  # the shard cannot be read: fatal, whatever `bad_rows` says
        message = str(exc) if isinstance(exc, ConfigError) else f"cannot read {shard['path']}: {exc}"
        return pa.table({}), {"offsets": np.zeros(0, np.int64), "keep": {k: [] for k in keep}, "bad": [],
                              "rows": 0, "fatal": message}
    offsets = np.flatnonzero([reason is None for reason in columns["_reason"]]).astype(np.int64)
    kept = {k: [columns[k][i] for i in offsets.tolist()] for k in keep}
    table = pa.table(columns) if count else pa.table({})
    return table, {"offsets": offsets, "keep": kept, "bad": bad, "rows": rows.owned, "fatal": ""}


def json_column(value: Any) -> str:
    """A row (or part of one) as a JSON string column value: Arrow needs one type per column across rows."""
    return json.dumps(value, ensure_ascii=False, default=str)
