"""Training pairs: reading, validation (file and row of every bad row), and the global-batch plan.

The plan is a list of global batches, each a list of `Pair`s; worker r of W takes rows [r*b, (r+1)*b) of
every global batch, so all workers step through the same batch and, with `same_source_batches`, every
global batch comes from one source dataset (the paper's recipe).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from diffembed.config import ConfigError
from diffembed.files import decode_lines, json_lines, open_input

log = logging.getLogger(__name__)


@dataclass
class Pair:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None
    source: str = "default"


@dataclass
class BadRows:
    count: int = 0
    examples: list[str] = field(default_factory=list)  # "file:row: reason", the first few

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {reason}")


def _kind(path: str, fmt: str) -> str:
    path = path.split("?", 1)[0] if "://" in path else path  # a URI's ?endpoint_override=… is not its suffix
    return fmt if fmt != "auto" else ("parquet" if path.endswith((".parquet", ".pq")) else "jsonl")


def _parse(data: bytes, kind: str) -> Iterator[tuple[int, Any]]:
    """(row number starting at 1, parsed row or an Exception) for every row of a file's bytes."""
    if kind == "parquet":
        import io

        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1)
        return
    yield from json_lines(decode_lines(data))


def _rows(path: str, fmt: str) -> Iterator[tuple[int, Any]]:
    """A local file's or a URI's rows (s3://, gs://, file://: `diffembed.files.open_input` resolves them)."""
    try:
        with open_input(path) as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    yield from _parse(data, _kind(path, fmt))


def _pair(row: Any, hard_negatives: int) -> Pair:
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    for key in ("query", "positive"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"missing or empty {key!r}")
    negatives = row.get("negatives") or []
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise ValueError("'negatives' must be a list of non-empty strings")
    if len(negatives) < hard_negatives:
        raise ValueError(f"needs {hard_negatives} hard negative(s), has {len(negatives)}")
    instruction = row.get("instruction")
    return Pair(
        query=row["query"],
        positive=row["positive"],
        negatives=negatives[:hard_negatives],
        instruction=instruction if isinstance(instruction, str) and instruction else None,
        source=str(row.get("source") or "default"),
    )


def _collect(checked: Iterator[tuple[str, Pair | str]], bad_rows: str) -> tuple[list[Pair], BadRows]:
    """Pairs and bad rows from (where, pair or reason) items; fatal on the first bad row if asked."""
    pairs, bad = [], BadRows()
    for where, item in checked:
        if isinstance(item, Pair):
            pairs.append(item)
        elif bad_rows == "fail":
            raise ConfigError(f"{where}: bad training row: {item}")
        else:
            bad.add(where, item)
    if bad.count:
        log.warning("skipped %d bad training rows; first: %s", bad.count, "; ".join(bad.examples[:3]))
    return pairs, bad


def _check(path: str, rows: Iterator[tuple[int, Any]], hard_negatives: int) -> Iterator[tuple[str, Pair | str]]:
    for number, row in rows:
        try:
            yield f"{path}:{number}", _pair(row, hard_negatives)
        except ValueError as exc:
            yield f"{path}:{number}", str(exc)


def load_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str) -> tuple[list[Pair], BadRows]:
    """Read and validate in this process (small files: dev sets, tests)."""
    checked = (item for path in files for item in _check(path, _rows(path, fmt), hard_negatives))
    pairs, bad = _collect(checked, bad_rows)
    if not pairs:
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    return pairs, bad


def read_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str) -> tuple[list[Pair], BadRows]:
    """Read and validate with Ray Data (parallel, any pyarrow filesystem), gathered on the driver for planning.

    Files are read whole (`read_binary_files`) so every bad row keeps its file and row number.
    """
    import ray.data

    def check(record: dict[str, Any]) -> list[dict[str, Any]]:
        path = _given(record["path"], files)  # Ray Data drops a URI's scheme: report the name the user gave
        rows = _check(path, _parse(record["bytes"], _kind(path, fmt)), hard_negatives)
        return [{"where": w, "pair": json.dumps(asdict(i)) if isinstance(i, Pair) else None,
                 "reason": None if isinstance(i, Pair) else i} for w, i in rows]

    ds = ray.data.read_binary_files(files, include_paths=True).flat_map(check)
    # Streamed to the driver block by block, each row kept once as its Pair (not all rows as records, then all
    # again as Pairs): the driver's peak stays near the size of the pairs themselves.
    rows = [(_order(r["where"], files), r["where"], Pair(**json.loads(r["pair"])) if r["pair"] else r["reason"])
            for r in ds.iter_rows()]
    rows.sort(key=lambda row: row[0])  # input order (file, row), whatever order the blocks arrived in
    pairs, bad = _collect(((where, item) for _, where, item in rows), bad_rows)
    if not pairs:
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    return pairs, bad


def _given(path: str, files: list[str]) -> str:
    """The input as given (`s3://bucket/key`) for a path as Ray Data reports it (`bucket/key`)."""
    if path in files:
        return path
    path = path.lstrip("/")
    bare = {f: f.split("?", 1)[0].split("://")[-1].lstrip("/") for f in files}
    hits = [f for f, b in bare.items() if path == b or path.endswith("/" + b)]
    return max(hits, key=lambda f: len(bare[f])) if hits else path


def _order(where: str, files: list[str]) -> tuple[int, int]:
    """Input order (file, row), whatever order Ray Data returned the rows in."""
    path, _, number = where.rpartition(":")
    index = files.index(path) if path in files else len(files)
    return index, int(number)


def plan_batches(
    pairs: list[Pair], global_batch: int, steps: int, same_source: bool, seed: int
) -> list[list[dict[str, Any]]]:
    """`steps` global batches of `global_batch` rows (as dicts), reshuffled every epoch.

    A source with fewer rows than a global batch cannot form a single-source batch; its rows are skipped.
    """
    rng = random.Random(seed)
    groups: dict[str, list[Pair]] = {}
    for pair in pairs:
        groups.setdefault(pair.source if same_source else "all", []).append(pair)
    usable = {k: v for k, v in groups.items() if len(v) >= global_batch}
    if not usable:
        raise ConfigError(
            f"not enough rows for one global batch of {global_batch}"
            + (" from a single source" if same_source else f" (have {len(pairs)})")
        )
    plan: list[list[dict[str, Any]]] = []
    while len(plan) < steps:  # one pass = one epoch
        epoch = []
        for rows in usable.values():
            rows = rows[:]
            rng.shuffle(rows)
            epoch += [rows[i : i + global_batch] for i in range(0, len(rows) - global_batch + 1, global_batch)]
        rng.shuffle(epoch)
        # only the batches the run takes become dicts: a large set's epoch would otherwise be copied whole
        plan += [[asdict(p) for p in batch] for batch in epoch[: steps - len(plan)]]
    return plan
