"""The encode pipeline: background preparation (prefetch), vectorised collation, tokenisation in slices."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import diffembed.models.embedder as embedder_module
from diffembed import Embedder, EmbedderConfig
from diffembed.models.prefetch import prefetch


def test_prefetch_keeps_order_and_runs_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    seen = []
    for item in prefetch(items(), depth=3):
        if item == 0:
            time.sleep(0.2)  # the producer fills its slots meanwhile
            assert len(produced) >= 4
        seen.append(item)
    assert seen == list(range(20))


def test_prefetch_raises_the_producers_error_where_it_happened():
    def items():
        yield 1
        yield 2
        raise KeyError("bad item")

    seen = []
    with pytest.raises(KeyError, match="bad item"):
        for item in prefetch(items(), depth=2):
            seen.append(item)
    assert seen == [1, 2]


def test_prefetch_stops_its_thread_when_the_consumer_stops():
    before = threading.active_count()
    stream = prefetch(iter(range(10_000)), depth=2)
    assert next(stream) == 0
    stream.close()
    assert threading.active_count() == before
    assert not [t for t in threading.enumerate() if t.name == "diffembed-prefetch"]


def naive_collate(emb: Embedder, segments) -> dict[str, torch.Tensor]:
    width = max(len(s.ids) for s in segments)
    ids = torch.full((len(segments), width), emb.tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(segments), width), dtype=torch.long)
    pool = torch.zeros((len(segments), width), dtype=torch.long)
    for row, seg in enumerate(segments):
        ids[row, : len(seg.ids)] = torch.tensor(seg.ids)
        att[row, : len(seg.ids)] = 1
        pool[row, : len(seg.ids)] = torch.tensor(seg.pool_mask)
    return {"input_ids": ids, "attention_mask": att, "pool_mask": pool}


def test_vectorised_collate_equals_row_by_row(minilm):
    segments = minilm.query_segments(["what is a diffusion model", "x"], instruction="Retrieve passages") + \
        minilm.document_segments(["a much longer document " * 30, "short one"])
    fast, slow = minilm.collate_host(segments), naive_collate(minilm, segments)
    for key in slow:
        assert torch.equal(fast[key], slow[key]), key


@pytest.fixture(scope="module")
def tiny_dream():
    return Embedder(EmbedderConfig(model="tiny:dream"))


@pytest.mark.parametrize("windows", ["first", "mean", "best"])
def test_sliced_tokenisation_equals_one_call_per_document(tiny_dream, monkeypatch, windows):
    """Many slices (FIRST_SLICE 2), windows waiting in length buckets across slices: every vector equals the
    document embedded alone (bidirectional attention through the key-padding mask)."""
    monkeypatch.setattr(embedder_module, "FIRST_SLICE", 2)
    monkeypatch.setattr(embedder_module, "MAX_SLICE", 8)
    base = tiny_dream
    policy = base.config.documents.model_copy(update={"windows": windows})
    emb = Embedder(base.config.model_copy(update={"documents": policy, "max_length": 32, "max_batch_tokens": 128}),
                   backbone=base.backbone)
    rng = np.random.default_rng(1)
    words = ["retrieval", "diffusion", "window", "vector", "the", "of", "query", "passage"]
    texts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 70, 20)]
    alone = [emb.encode_document_windows([t]) for t in texts]
    together = emb.encode_document_windows(texts)
    expected = np.concatenate([a.vectors for a in alone])
    assert together.vectors.shape == expected.shape
    assert np.abs(together.vectors - expected).max() < 1e-5
    assert together.text_index.tolist() == [i for i, a in enumerate(alone) for _ in range(len(a.vectors))]
    assert together.char_spans.tolist() == [s for a in alone for s in a.char_spans.tolist()]
    if windows != "best":
        assert np.abs(emb.encode_documents(texts) - expected).max() < 1e-5


def test_spans_off_gives_the_same_windows(minilm):
    texts = ["one two three " * 100, "short"]
    with_spans = minilm.document_segments(texts, windows="mean")
    without = minilm.document_segments(texts, windows="mean", spans=False)
    assert [(s.ids, s.token_span) for s in with_spans] == [(s.ids, s.token_span) for s in without]
    assert all(s.char_span is None for s in without)
