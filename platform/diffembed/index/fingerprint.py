"""The embedding fingerprint kept with every collection: which function made its vectors.

A collection is only useful to queries embedded by the same function. The fingerprint records the model's
identity (a digest of its files' contents, sampled for the large weight files, so a copy of a checkpoint on
another machine matches and a retrained one does not; a hub model's is computed from the hub, without downloading
its weights), the resolved embedding function (what `diffembed.json`
holds, the document policy included), the vector size and distance, and the sparse encoding. Opening a
collection with a different fingerprint is a one-line error naming what differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffembed.config import SCORING_FIELDS, EmbedderConfig, dotted

FINGERPRINT_VERSION = 1
SPARSE_ENCODING = "bm25-idf-v1"  # diffembed.index.sparse: stemmed terms, MurmurHash3 ids, TF part of BM25
SAMPLE_BYTES = 1 << 16  # per end of a large file
SMALL_FILE = 1 << 20  # files up to this size are hashed whole


def _digest(files: list[tuple[str, int]], read: Callable[[str, int, int], bytes]) -> str:
    """sha256 over (name, size) of every file, in name order, and its bytes: small files whole, large ones both
    ends. `read(name, start, length)` gives the bytes."""
    digest = hashlib.sha256()
    for name, size in sorted(files):
        digest.update(f"{name}:{size};".encode())
        if size <= SMALL_FILE:
            digest.update(read(name, 0, size))
        else:
            digest.update(read(name, 0, SAMPLE_BYTES))
            digest.update(read(name, size - SAMPLE_BYTES, SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def model_digest(path: Path) -> str:
    """The digest of the checkpoint's files in `path` (`diffembed.json` aside)."""
    files = [(p.name, p.stat().st_size) for p in Path(path).iterdir() if p.is_file() and p.name != "diffembed.json"]

    def read(name: str, start: int, length: int) -> bytes:
        with open(Path(path) / name, "rb") as f:
            f.seek(start)
            return f.read(length)

    return _digest(files, read)


def hub_model_digest(repo: str) -> str:
    """The digest a hub model's downloaded snapshot would have (`model_digest` of it: the files
    `loading.HUB_FILES` selects at the repository's top level), computed from the hub: file sizes from its
    listing, small files downloaded (into the hub cache), the two ends of each large file by byte-range requests.
    A job's driver fingerprints a 7B hub model without downloading its weights."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, get_session, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    from diffembed.models.loading import HUB_FILES

    info = HfApi().model_info(repo, files_metadata=True)
    files = [(s.rfilename, int(s.size)) for s in info.siblings or []
             if "/" not in s.rfilename and s.rfilename != "diffembed.json"
             and any(fnmatch(s.rfilename, pattern) for pattern in HUB_FILES)]

    sizes = dict(files)

    def read(name: str, start: int, length: int) -> bytes:
        if sizes[name] <= SMALL_FILE:  # whole (and into the cache: the snapshot downloads it anyway)
            return Path(hf_hub_download(repo, name, revision=info.sha)).read_bytes()
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}"}
        response = get_session().get(hf_hub_url(repo, name, revision=info.sha), headers=headers,
                                      follow_redirects=True)
        hf_raise_for_status(response)
        data = response.content
        return data if response.status_code == 206 else data[start : start + length]

    return _digest(files, read)


def checkpoint_digest(model: str) -> str:
    """The digest of `model`: a local checkpoint's files, or a hub model's from the hub (its local snapshot's when
    the hub cannot be reached: offline, with the model in the cache)."""
    from diffembed.models.loading import hub_repo, resolve_model_path

    repo = hub_repo(model)
    if repo is not None:
        try:
            return hub_model_digest(repo)
        except Exception:  # offline, unreachable: the cached snapshot (or resolve_model_path's one-line error)
            pass
    return model_digest(resolve_model_path(model))


def embedding_fingerprint(embedder: EmbedderConfig, dim: int, distance: str, sparse: bool) -> dict[str, Any]:
    from diffembed.models.loading import resolve_embedding_function

    digest = checkpoint_digest(embedder.model)
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
