"""BM25 sparse vectors for Qdrant's `Modifier.IDF`.

A document vector holds only the BM25 term-frequency part, `tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))`;
the collection's IDF modifier multiplies in `idf(term)` from live corpus statistics at query time, so
vectors written today stay correct as the corpus grows. Queries weigh each unique term 1.

Terms: bm25s's default split (`\\b\\w\\w+\\b`, lower-cased) and English stopword list, then the Snowball
English stemmer (PyStemmer). Term ids are unsigned 32-bit MurmurHash3 values of the stemmed term: no
vocabulary to ship or keep in sync between the job and the service. Colliding terms are summed.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import Counter

import mmh3
import Stemmer
from bm25s.stopwords import STOPWORDS_EN
from qdrant_client import models

SPARSE_VECTOR_NAME = "bm25"

_SPLIT = re.compile(r"(?u)\b\w\w+\b")  # bm25s / scikit-learn default token pattern
_STOPWORDS = frozenset(STOPWORDS_EN)
_local = threading.local()  # PyStemmer objects are not thread-safe (the service calls this from threads)


def _stemmer() -> Stemmer.Stemmer:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("english")
    return stemmer


@functools.lru_cache(maxsize=1 << 18)
def _stem(word: str) -> str:
    return _stemmer().stemWord(word)


def terms(text: str) -> list[str]:
    """Stemmed, stopword-free terms of `text`, in order (repeats kept)."""
    return [_stem(w) for w in _SPLIT.findall(text.lower()) if w not in _STOPWORDS]


@functools.lru_cache(maxsize=1 << 18)
def term_id(term: str) -> int:
    return mmh3.hash(term, signed=False)


def _sparse(weights: Counter[int] | dict[int, float]) -> models.SparseVector:
    indices = sorted(weights)
    return models.SparseVector(indices=indices, values=[float(weights[i]) for i in indices])


def document_vector(text: str, avg_len: float = 256, k1: float = 1.2, b: float = 0.75) -> models.SparseVector:
    """BM25 term-frequency weights of a document (IDF left to the collection's modifier)."""
    doc_terms = terms(text)
    if not doc_terms:
        return models.SparseVector(indices=[], values=[])
    norm = k1 * (1 - b + b * len(doc_terms) / avg_len)
    weights: dict[int, float] = {}
    for term, tf in Counter(doc_terms).items():
        tid = term_id(term)
        weights[tid] = weights.get(tid, 0.0) + tf * (k1 + 1) / (tf + norm)
    return _sparse(weights)


def query_vector(text: str) -> models.SparseVector:
    """Weight 1 per unique query term (2 if two terms collide on one id)."""
    return _sparse(Counter(term_id(t) for t in set(terms(text))))
