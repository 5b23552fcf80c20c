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

import numpy as np

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


@dataclass
class TrainingRows:
    """The validated training rows of a run, left where Ray Data put them: the driver holds references only.

    `blocks` are Ray object references to Arrow tables whose `pair` column is one Pair as JSON (bad rows are
    in them too, unreferenced); row i of the input order (file, row) is row `offset[i]` of `blocks[block[i]]`,
    and `sources[i]` names its source. A 10^6-row set costs the driver a few MB of arrays, not its text.
    """

    blocks: list[Any]
    block: np.ndarray  # (N,) int32
    offset: np.ndarray  # (N,) int64
    sources: list[str]
    bad: BadRows

    def __len__(self) -> int:
        return len(self.block)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) arrays of the same shape as `positions` (row numbers in input order)."""
        return self.block[positions], self.offset[positions]

    def pairs(self, positions: np.ndarray | None = None) -> list[Pair]:
        """The rows at `positions` (all by default) as Pairs, fetched here: small sets and tests only."""
        positions = np.arange(len(self)) if positions is None else np.asarray(positions)
        block, offset = self.locate(positions)
        return [Pair(**row) for row in take_rows(self.blocks, block, offset)]


def take_rows(blocks: list[Any], block: np.ndarray, offset: np.ndarray) -> list[dict[str, Any]]:
    """Rows `offset[i]` of `blocks[block[i]]` as dicts, in that order; one block is fetched at a time (a local
    block is mapped from Ray's object store without a copy) and dropped before the next."""
    import ray

    block, offset = np.asarray(block).ravel(), np.asarray(offset).ravel()
    rows: list[Any] = [None] * len(block)
    for b in np.unique(block):
        where = np.flatnonzero(block == b)
        column = ray.get(blocks[int(b)]).column("pair").take(offset[where]).to_pylist()
        for i, text in zip(where.tolist(), column):
            rows[i] = json.loads(text)
    return rows


def scan_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str) -> TrainingRows:
    """Read and validate with Ray Data (parallel, any pyarrow filesystem); the rows stay in Ray's object store.

    Files are read whole (`read_binary_files`) so every bad row keeps its file and row number. The driver gets
    each row's place and source (one small task per block), never its text: workers fetch the rows they train on.
    """
    import ray
    import ray.data

    def check(record: dict[str, Any]) -> list[dict[str, Any]]:
        path = _given(record["path"], files)  # Ray Data drops a URI's scheme: report the name the user gave
        index = files.index(path) if path in files else len(files)
        rows = _check(path, _parse(record["bytes"], _kind(path, fmt)), hard_negatives)
        return [{"file": index, "row": int(w.rpartition(":")[2]), "where": w,
                 "pair": json.dumps(asdict(i)) if isinstance(i, Pair) else None,
                 "source": i.source if isinstance(i, Pair) else None,
                 "reason": None if isinstance(i, Pair) else i} for w, i in rows]

    blocks = ray.data.read_binary_files(files, include_paths=True).flat_map(check).to_arrow_refs()
    place = ray.remote(num_cpus=1)(_places)
    places = ray.get([place.remote(ref) for ref in blocks])
    block = np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(places)] or [np.zeros(0, np.int32)])
    offset, key, source, bad_where = [], [], [], []
    for file_row, offsets, sources, bad in places:
        key.append(file_row)
        offset.append(offsets)
        source += sources
        bad_where += bad
    key_all = np.concatenate(key) if key else np.zeros((0, 2), np.int64)  # (N, 2): file, row
    order = np.lexsort((key_all[:, 1], key_all[:, 0])) if len(key_all) else np.zeros(0, np.int64)
    bad_where.sort()  # input order, whatever order the blocks arrived in
    _, bad = _collect(((where, reason) for _, where, reason in bad_where), bad_rows)
    if not len(order):
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    offset_all = np.concatenate(offset)
    return TrainingRows(blocks=blocks, block=block[order], offset=offset_all[order],
                        sources=[source[i] for i in order.tolist()], bad=bad)


def _places(table) -> tuple[np.ndarray, np.ndarray, list[str], list[tuple[tuple[int, int], str, str]]]:
    """A block's good rows as ((file, row) keys (n, 2), offsets in the block, sources) and its bad rows as
    ((file, row), where, reason)."""
    reason = table.column("reason").to_pylist()
    good = np.array([r is None for r in reason], dtype=bool)
    file, row = (np.asarray(table.column(c).to_numpy(), dtype=np.int64) for c in ("file", "row"))
    offsets = np.flatnonzero(good)
    sources = table.column("source").take(offsets).to_pylist()
    where = table.column("where").to_pylist()
    bad = [((int(file[i]), int(row[i])), where[i], reason[i]) for i in np.flatnonzero(~good).tolist()]
    return np.stack([file[offsets], row[offsets]], axis=1), offsets, sources, bad


def read_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str) -> tuple[list[Pair], BadRows]:
    """`scan_pairs`, every row then fetched to this process as a Pair (small sets and tests)."""
    rows = scan_pairs(files, fmt, hard_negatives, bad_rows)
    return rows.pairs(), rows.bad


def _given(path: str, files: list[str]) -> str:
    """The input as given (`s3://bucket/key`) for a path as Ray Data reports it (`bucket/key`)."""
    if path in files:
        return path
    path = path.lstrip("/")
    bare = {f: f.split("?", 1)[0].split("://")[-1].lstrip("/") for f in files}
    hits = [f for f, b in bare.items() if path == b or path.endswith("/" + b)]
    return max(hits, key=lambda f: len(bare[f])) if hits else path


def plan_positions(
    sources: list[str], global_batch: int, steps: int, same_source: bool, seed: int
) -> np.ndarray:
    """(steps, global_batch) row numbers (input order): `steps` global batches, reshuffled every epoch; with
    `same_source`, each batch from one source. A source with fewer rows than a global batch cannot form a
    single-source batch; its rows are skipped."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(sources):
        groups.setdefault(source if same_source else "all", []).append(i)
    usable = {k: v for k, v in groups.items() if len(v) >= global_batch}
    if not usable:
        raise ConfigError(
            f"not enough rows for one global batch of {global_batch}"
            + (" from a single source" if same_source else f" (have {len(sources)})")
        )
    plan: list[list[int]] = []
    while len(plan) < steps:  # one pass = one epoch
        epoch = []
        for rows in usable.values():
            rows = rows[:]
            rng.shuffle(rows)
            epoch += [rows[i : i + global_batch] for i in range(0, len(rows) - global_batch + 1, global_batch)]
        rng.shuffle(epoch)
        plan += epoch[: steps - len(plan)]
    return np.array(plan, dtype=np.int64).reshape(steps, global_batch)


def plan_batches(
    pairs: list[Pair], global_batch: int, steps: int, same_source: bool, seed: int
) -> list[list[dict[str, Any]]]:
    """`plan_positions` over Pairs held in this process: the global batches as lists of row dicts."""
    plan = plan_positions([p.source for p in pairs], global_batch, steps, same_source, seed)
    return [[asdict(pairs[i]) for i in batch] for batch in plan.tolist()]


class StepRows:
    """A worker's rows of every step, fetched from the blocks of `TrainingRows` a window of steps at a time.

    `block` and `offset` are the plan's (steps, global_batch) places; rank r of W takes columns
    [r*b, (r+1)*b). A window holds about `window_rows` rows, so a worker never holds more of the set than that.
    """

    def __init__(self, blocks: list[Any], block: np.ndarray, offset: np.ndarray, rank: int, per_worker: int,
                 window_rows: int = 2048):
        mine = slice(rank * per_worker, (rank + 1) * per_worker)
        self.blocks, self.block, self.offset = blocks, block[:, mine], offset[:, mine]  # (steps, b)
        self.per_worker = per_worker
        self.window = max(1, window_rows // per_worker)  # steps per fetch
        self._start, self._rows = -1, []

    def __len__(self) -> int:
        return len(self.block)

    def __call__(self, step: int) -> list[dict[str, Any]]:
        start = step - step % self.window
        if start != self._start:
            stop = min(start + self.window, len(self))
            self._rows = take_rows(self.blocks, self.block[start:stop], self.offset[start:stop])
            self._start = start
        at = (step - start) * self.per_worker
        return self._rows[at : at + self.per_worker]
