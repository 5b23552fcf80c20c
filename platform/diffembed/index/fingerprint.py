"""The embedding fingerprint kept with every collection: which function made its vectors.

A collection is only useful to queries embedded by the same function. The fingerprint records the model's
identity (a digest of its files' contents, sampled for the large weight files, so a copy of a checkpoint on
another machine matches and a retrained one does not), the resolved embedding function (what `diffembed.json`
holds, the document policy included), the vector size and distance, and the sparse encoding. Opening a
collection with a different fingerprint is a one-line error naming what differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from diffembed.config import SCORING_FIELDS, EmbedderConfig, dotted

FINGERPRINT_VERSION = 1
SPARSE_ENCODING = "bm25-idf-v1"  # diffembed.index.sparse: stemmed terms, MurmurHash3 ids, TF part of BM25
SAMPLE_BYTES = 1 << 16  # per end of a large file
SMALL_FILE = 1 << 20  # files up to this size are hashed whole


def model_digest(path: Path) -> str:
    """sha256 over the checkpoint's files: small ones whole, large ones by name, size and both ends."""
    digest = hashlib.sha256()
    for item in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != "diffembed.json"):
        size = item.stat().st_size
        digest.update(f"{item.name}:{size};".encode())
        with open(item, "rb") as f:
            if size <= SMALL_FILE:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLE_BYTES))
                f.seek(size - SAMPLE_BYTES)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def embedding_fingerprint(embedder: EmbedderConfig, dim: int, distance: str, sparse: bool) -> dict[str, Any]:
    from diffembed.models.loading import resolve_embedding_function, resolve_model_path

    path = resolve_model_path(embedder.model)
    digest = model_digest(path)
    if embedder.lora_adapter:
        digest += "+" + model_digest(Path(embedder.lora_adapter).expanduser())
    return {
        "version": FINGERPRINT_VERSION,
        "model": {"name": embedder.model, "digest": digest},
        "function": resolve_embedding_function(embedder),
        "vector": {"size": int(dim), "distance": distance},
        "sparse": SPARSE_ENCODING if sparse else None,
    }


# The model's name is informational: the same weights under another path (another machine) are the same model;
# how window scores aggregate is a search setting.
IGNORED = {"model.name", *(f"function.documents.{key}" for key in SCORING_FIELDS)}


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key (stored X, now Y)` for every field that differs, in a stable order."""
    a, b = dotted(stored), dotted(wanted)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in IGNORED or a.get(key) == b.get(key):
            continue
        out.append(f"{key} (stored {a.get(key)!r}, now {b.get(key)!r})")
    return out


def mismatch_message(collection: str, stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    diff = differences(stored, wanted)
    if not diff:
        return None
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    return (f"collection {collection!r} was embedded by a different embedding function: {shown}. "
            "Use another store.collection, or re-embed it (embed job: recreate=true)")
