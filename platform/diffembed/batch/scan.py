"""The batch job's pre-pass over the input: duplicate document ids and bad rows, found before anything is written.

Why a pre-pass: two rows with the same id may sit in different blocks or files, so no per-block check can see
them, and which one the collection ends up holding must not depend on which actor wrote last. The pre-pass
reads every unit once (the same parser as the job, `unit_rows`), keeps only (id, position) per row and
hash-partitions them into buckets; one reduce task per bucket finds the ids seen more than once. So no process
ever holds every id (a bucket holds 1/B of them), the driver receives only the duplicates and the first bad
rows, and the main pass still streams (a hash-partitioned dedupe stage inside the pipeline would be an
all-to-all barrier: nothing written before everything is read). The price is reading and parsing the input
twice; parsing is cheap next to embedding (the bench measures it). The winner of a duplicated id is its LAST
occurrence in input order (files in the order given, then position in the file): "a later line replaces an
earlier one", as when appending corrections to a JSONL file. The earlier occurrences are skipped with reason
DUPLICATE and counted as `duplicates`.

Plain Ray tasks rather than a Ray Data groupby: two waves of small tasks finish in well under a second on a
small corpus, where a Ray Data shuffle costs several seconds of planning and scheduling.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffembed.batch.config import InputConfig
from diffembed.batch.reading import unit_files, unit_rows, unit_start

EXAMPLES = 5


@dataclass
class ScanResult:
    rows: int = 0
    bad_rows: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (position, reason), earliest first
    duplicate_ids: int = 0
    duplicate_rows: int = 0  # rows that are not their id's last occurrence (not embedded)
    duplicate_examples: list[tuple[str, list[int]]] = field(default_factory=list)  # (id, positions)
    drop: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # positions to skip, sorted


def _bucket(doc_id: str, buckets: int) -> int:
    return zlib.crc32(doc_id.encode("utf-8")) % buckets  # stable across processes (str hash is salted)


def _scan_unit(unit: dict[str, Any], cfg: InputConfig, buckets: int) -> tuple:
    """(summary, then per bucket (ids, positions)) of one unit; bad rows are summarized, not bucketed."""
    ids: list[list[str]] = [[] for _ in range(buckets)]
    orders: list[list[int]] = [[] for _ in range(buckets)]
    rows, bad, examples = 0, 0, []
    for row in unit_rows(unit, cfg):
        rows += 1
        if row["skip"]:
            bad += 1
            if len(examples) < EXAMPLES:
                examples.append((row["order"], row["skip"]))
            continue
        b = _bucket(row["doc_id"], buckets)
        ids[b].append(row["doc_id"])
        orders[b].append(row["order"])
    parts = tuple((ids[b], np.asarray(orders[b], dtype=np.int64)) for b in range(buckets))
    return ({"rows": rows, "bad": bad, "examples": examples}, *parts)


def _find_duplicates(*parts: tuple[list[str], np.ndarray]) -> dict[str, Any]:
    """Within one bucket: how many ids repeat, the positions to drop (all but each id's last), the first ids."""
    positions: dict[str, list[int]] = {}
    repeated: set[str] = set()
    for ids, orders in parts:
        for doc_id, order in zip(ids, orders.tolist()):
            seen = positions.setdefault(doc_id, [])
            if seen:
                repeated.add(doc_id)
            seen.append(order)
    groups = sorted((sorted(positions[d]), d) for d in repeated)  # by first occurrence
    drop = [o for orders, _ in groups for o in orders[:-1]]
    return {"ids": len(groups), "drop": np.sort(np.asarray(drop, dtype=np.int64)),
            "examples": [(d, orders) for orders, d in groups[:EXAMPLES]]}


def scan_corpus(units: list[dict[str, Any]], cfg: InputConfig) -> ScanResult:
    """Run the pre-pass on the current Ray cluster (see the module docstring)."""
    import ray

    from diffembed.placement import where_to_read

    buckets = int(np.clip(len(units) // 8, 1, 64))
    scan = ray.remote(num_cpus=1)(_scan_unit).options(num_returns=buckets + 1,
                                                      **where_to_read(unit_files(units).values()))
    reduce = ray.remote(num_cpus=1)(_find_duplicates)
    mapped = [scan.remote(u, cfg, buckets) for u in units]
    reduced = [reduce.remote(*[m[b + 1] for m in mapped]) for b in range(buckets)]
    result = ScanResult()
    for summary in ray.get([m[0] for m in mapped]):
        result.rows += summary["rows"]
        result.bad_rows += summary["bad"]
        result.bad_examples.extend(summary["examples"])
    result.bad_examples = sorted(result.bad_examples)[:EXAMPLES]
    found = ray.get(reduced)
    result.duplicate_ids = sum(f["ids"] for f in found)
    result.drop = np.sort(np.concatenate([f["drop"] for f in found]))
    result.duplicate_rows = len(result.drop)
    result.duplicate_examples = sorted((e for f in found for e in f["examples"]), key=lambda e: e[1])[:EXAMPLES]
    return result


def assign_drops(units: list[dict[str, Any]], drop: np.ndarray) -> list[dict[str, Any]]:
    """The units, each with the positions it must skip (`drop`), found by its position range."""
    if not len(drop):
        return units
    starts = np.array([unit_start(u) for u in units], dtype=np.int64)  # (U,), increasing
    owner = np.searchsorted(starts, drop, side="right") - 1  # (R,) unit of each dropped position
    mine = np.split(drop, np.cumsum(np.bincount(owner, minlength=len(units)))[:-1])  # U arrays, drop is sorted
    return [{**unit, "drop": m.tolist()} if len(m) else unit for unit, m in zip(units, mine)]
