"""Training pairs: reading, validation (file and row of every bad row), and the global-batch plan.

The plan is (steps, global_batch) row numbers in input order (`plan_positions`); worker r of W takes columns
[r*b, (r+1)*b) of every global batch, so all workers step through the same batch and, with
`same_source_batches`, every global batch comes from one source dataset (the paper's recipe). The rows themselves
stay in Ray's object store (`scan_pairs`); each worker fetches its own (`StepRows`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from diffembed.config import ConfigError
from diffembed.rowfiles import (SHARD_BYTES, BadRows, ScannedRows, checked, collect_bad, file_rows, scan_rows,
                                take_rows)


@dataclass
class Pair:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    instruction: str | None = None
    source: str = "default"


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


def _pair_columns(hard_negatives: int):
    """The row check of `scan_rows`: a Pair as JSON (`pair`) and its `source`, or why the row is bad."""

    def check(row: Any) -> dict[str, Any]:
        pair = _pair(row, hard_negatives)
        return {"pair": json.dumps(asdict(pair)), "source": pair.source}

    return check


def load_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str) -> tuple[list[Pair], BadRows]:
    """Read and validate in this process (small files: dev sets, tests)."""
    pairs, bad = [], []
    for path in files:
        for where, item in checked(path, file_rows(path, fmt), lambda row: {"pair": _pair(row, hard_negatives)}):
            if isinstance(item, dict):
                pairs.append(item["pair"])
            else:
                bad.append((where, item))
    found = collect_bad(bad, bad_rows)
    if not pairs:
        raise ConfigError(f"no usable training rows in {', '.join(files)}")
    return pairs, found


def take_pairs(blocks: list[Any], block: np.ndarray, offset: np.ndarray) -> list[dict[str, Any]]:
    """Rows `offset[i]` of `blocks[block[i]]` as Pair dicts, in that order."""
    return [json.loads(text) for text in take_rows(blocks, block, offset, "pair")]


def scan_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str,
               shard_bytes: int = SHARD_BYTES) -> ScannedRows:
    """Read and validate in Ray tasks (one per shard of about `shard_bytes`, any pyarrow filesystem); the rows stay
    in Ray's object store and workers fetch the ones they train on (`StepRows`): the driver holds each row's place
    and its `columns["source"]`, never its text."""
    return scan_rows(files, fmt, _pair_columns(hard_negatives), bad_rows, keep=("source",), shard_bytes=shard_bytes)


def read_pairs(files: list[str], fmt: str, hard_negatives: int, bad_rows: str,
               shard_bytes: int = SHARD_BYTES) -> tuple[list[Pair], BadRows]:
    """`scan_pairs`, every row then fetched to this process as a Pair (small sets and tests)."""
    rows = scan_pairs(files, fmt, hard_negatives, bad_rows, shard_bytes)
    return [Pair(**row) for row in take_pairs(rows.blocks, rows.block, rows.offset)], rows.bad


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
    """A worker's rows of every step, fetched from the blocks of `scan_pairs` a window of steps at a time.

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
            self._rows = take_pairs(self.blocks, self.block[start:stop], self.offset[start:stop])
            self._start = start
        at = (step - start) * self.per_worker
        return self._rows[at : at + self.per_worker]
