"""Copy a collection from the embedded store (Qdrant Edge) to a Qdrant server: moving off one machine.

The copy streams the source page by page (`iter_points`) and writes every point to the target as it is
(`upsert_points`): the same ids, the same dense (or multivector) and BM25 sparse vectors, the same payloads. The
target collection is created with the source's vector name, size and distance, single or multivector, its BM25
setting, its embedding
fingerprint and its tuned hybrid fusion (when set); a target that already exists must fit all of these, so a
target holding vectors of another embedding function fails with the one-line fingerprint error before
anything is written. The target's own
layout (`shards`, `replication_factor`, `on_disk_vectors`, `quantization`, ...) comes from `target.*`.

Resumable: for each source page the copy asks the target which of its ids it already holds and writes only
the others (counted as `points_already_present`), so a rerun after a crash or a lost connection does not
redo acknowledged pages. A rerun assumes the source did not change in between; a point rewritten in the
source since the first run keeps its old copy in the target (drop the target collection to copy afresh).

Point ids are `uuid5(collection, doc_id, chunk)` of the SOURCE collection name, and a copy keeps them. A
target under another name holds the right points and reads correctly, but the embed job writing into it later
computes ids from the new name: a document it rewrites in place (`skip_existing=false`, which relies on
overwriting by id) keeps the copied points beside the new ones, i.e. duplicates. (A default rerun is safe: it
skips complete documents by payload and deletes incomplete ones before writing.) Keep the same collection
name on the server (the job warns when the names differ).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field

from diffembed.config import ConfigError, ConfigModel
from diffembed.index.config import StoreConfig
from diffembed.index.store import StoreError

log = logging.getLogger(__name__)

# The target settings a copy takes from the source (the points' vectors only fit a collection laid out so).
LAYOUT_FIELDS = ("vector_name", "distance", "sparse")


class CopyConfig(ConfigModel):
    """Copy one Edge collection (`source.path` + `source.collection`) to a Qdrant server (`target.url`)."""

    source: StoreConfig = Field(description="The embedded (Edge) collection to copy: `path` and `collection`.")
    target: StoreConfig = Field(
        description="The server collection to fill: `url` (+ QDRANT_API_KEY) and `collection` (keep the source's "
        "name: ids derive from it). Vector name, distance and BM25 come from the source."
    )
    batch_size: int = Field(256, ge=1, description="Points per page read from the source and written to the target.")


def _location(cfg: StoreConfig) -> tuple[str, str, str]:
    if cfg.url:
        return ("server", cfg.url.rstrip("/"), cfg.collection)
    return ("edge", str(Path(cfg.path).expanduser().resolve()), cfg.collection)


def rename_warning(source: str, target: str) -> str | None:
    if source == target:
        return None
    return (f"the target collection {target!r} is named differently from the source {source!r}: copied points keep "
            f"the ids of {source!r}, so an embed job rewriting documents in {target!r} later (skip_existing=false) "
            f"computes other ids and leaves duplicates; keep the name {source!r} unless the target is only read")


def _norm_id(value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return str(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _is_transport(exc: BaseException) -> bool:
    """Errors of reaching or talking to the server (after the store's own retries), not bugs or bad input."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, (ResponseHandlingException, UnexpectedResponse, ConnectionError, TimeoutError, OSError)):
        return True
    try:
        import grpc

        return isinstance(exc, grpc.RpcError)
    except ImportError:  # pragma: no cover
        return False


def _source_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """Vector name, size, distance, single or multivector, and BM25 of an Edge collection, from its
    collection.json."""
    return {"vector_name": meta["vector_name"], "size": int(meta["size"]), "distance": meta["distance"],
            "sparse": bool(meta.get("sparse")), "multivector": bool(meta.get("multivector"))}


def _target_config(cfg: StoreConfig, layout: dict[str, Any], explicit: set[str]) -> StoreConfig:
    """`cfg` with the source's layout; a field set explicitly to something else is a one-line ConfigError."""
    for name in LAYOUT_FIELDS:
        if name in explicit and getattr(cfg, name) != layout[name]:
            raise ConfigError(f"target.{name} is {getattr(cfg, name)!r} but the source collection has "
                              f"{layout[name]!r}; a copy keeps the source's (leave target.{name} unset)")
    return cfg.model_copy(update={name: layout[name] for name in LAYOUT_FIELDS})


def _check_locations(cfg: CopyConfig, target_cfg: StoreConfig, injected: bool) -> None:
    if _location(cfg.source) == _location(target_cfg):
        raise ConfigError(f"source and target are the same collection ({cfg.source.collection!r} at "
                          f"{cfg.source.url or cfg.source.path}); a copy needs another target")
    if cfg.source.url:
        raise ConfigError("the source must be an embedded (Edge) collection: unset source.url and set source.path "
                          "(to move a collection between servers, use Qdrant's snapshots)")
    if not injected and not target_cfg.url:
        raise ConfigError("the target needs target.url (a Qdrant server, e.g. http://qdrant:6333)")


def copy_collection(cfg: CopyConfig, progress: bool = True, target_store: Any = None) -> dict[str, Any]:
    """Copy `cfg.source` into `cfg.target` (see the module docstring); returns the summary.

    `target_store`: an open ServerStore to write into instead of opening `cfg.target` (tests pass one over
    qdrant-client's local mode); its own config names the collection and must have the source's layout. The
    caller keeps it (it is not closed here).
    """
    from diffembed.index.edge import EdgeStore
    from diffembed.index.server import ServerStore

    started = time.perf_counter()
    injected = target_store is not None
    _check_locations(cfg, target_store.cfg if injected else cfg.target, injected)
    src_name = cfg.source.collection
    tgt_name = target_store.cfg.collection if injected else cfg.target.collection
    warning = rename_warning(src_name, tgt_name)
    if warning:
        if progress:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        else:
            log.warning(warning)

    source = EdgeStore(cfg.source)
    target = target_store
    try:
        if not source.exists():
            raise StoreError(f"source collection {src_name!r} does not exist under {source.root}")
        meta = source.meta()  # readable, and not written by a newer Edge
        fingerprint, layout = meta.get("fingerprint"), _source_layout(meta)
        if injected:
            differ = [f"{n} {getattr(target.cfg, n)!r} (source: {layout[n]!r})"
                      for n in LAYOUT_FIELDS if getattr(target.cfg, n) != layout[n]]
            if differ:
                raise ConfigError(f"the target store's config differs from the source collection: {', '.join(differ)}")
        else:
            target = ServerStore(_target_config(cfg.target, layout, cfg.target.model_fields_set))
        where = target.cfg.url or "the target store"
        try:
            # a mismatch fails here, before any write
            target.ensure_collection(layout["size"], fingerprint, multivector=layout["multivector"])
        except ConfigError:
            raise
        except Exception as exc:
            if not _is_transport(exc):
                raise
            raise StoreError(f"cannot reach the target Qdrant server {where}: {_one_line(exc)}") from None
        settings = source.search_settings()
        if settings is not None:  # the tuned hybrid fusion travels with the collection
            target.set_search_settings(settings)

        copied = present = seen = 0
        try:
            with target.bulk_load():
                for page in source.iter_points(cfg.batch_size):
                    have = {_norm_id(i) for i in target.existing_ids([p.id for p in page])}
                    missing = [p for p in page if _norm_id(p.id) not in have]
                    if missing:
                        target.upsert_points(missing)
                    copied += len(missing)
                    present += len(page) - len(missing)
                    seen += len(page)
                    if progress:
                        print(f"progress: {seen} points read, {copied} copied, {present} already present",
                              file=sys.stderr, flush=True)
            in_target = target.count()
        except Exception as exc:
            if isinstance(exc, ConfigError) or not _is_transport(exc):
                raise
            raise StoreError(f"the copy to {where} stopped after {copied} new points ({_one_line(exc)}); rerun the "
                             "same command to resume (points already in the target are skipped)") from None
    finally:
        source.close()
        if target is not None and not injected:
            target.close()

    wall = time.perf_counter() - started
    return {
        "source_collection": src_name,
        "target_collection": tgt_name,
        "points_in_source": seen,
        "points_copied": copied,
        "points_already_present": present,
        "points_in_target": in_target,
        "wall_s": round(wall, 3),
        "points_per_s": round(copied / wall, 1) if wall > 0 else 0.0,
    }
