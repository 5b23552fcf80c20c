"""Late chunking and mask-token readout in the Embedder; window-score aggregation (documents.window_scores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.documents import window_scores

LONG = " ".join(f"w{i % 97} token{i}" for i in range(400))  # ~1,400 MiniLM tokens: several macro-windows
DOCS = [LONG, "a short note about cats", "dogs " * 150, "t"]


def late(minilm, **docs) -> Embedder:
    policy = {"windows": "late_chunk", "chunk_tokens": 64, "overlap": 32, **docs}
    return Embedder(EmbedderConfig(max_length=256, documents=policy), backbone=minilm.backbone)


def token_states(emb: Embedder, segment) -> torch.Tensor:
    batch = emb.collate([segment])
    with torch.no_grad():
        return emb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]


def test_shipped_late_chunk_policy_fills_its_windows(minilm):
    """The shipped pipeline policy (embed_cpu.yaml; Serve checks its own equals the collection's) owns 3 chunks of
    a 256-token window: a long document costs ~1.3x the tokens it has, not the ~2x of a context that leaves room
    for 2 chunks only (overlap 64)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    shipped = yaml.safe_load((root / "jobs/configs/embed_cpu.yaml").read_text())["embedder"]["documents"]
    served = yaml.safe_load((root / "serve/config.yaml").read_text())["applications"][0]["args"]["embedder"]
    assert served["documents"] == shipped

    def cost(policy: dict) -> float:
        emb = Embedder(EmbedderConfig(max_length=256, documents=policy), backbone=minilm.backbone)
        segments = emb.document_segments([LONG])
        return sum(len(s.ids) for s in segments) / segments[0].text_tokens

    assert cost(shipped) < 1.4
    assert cost({**shipped, "overlap": 64}) > 1.8


def test_late_chunks_cover_every_token_once_with_context(minilm):
    emb = late(minilm)
    segments = emb.document_segments([LONG])
    n = segments[0].text_tokens
    spans = [span for s in segments for span in s.group_spans]
    assert len(segments) > 2 and all(len(s.ids) <= 256 for s in segments)
    assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(b - a == 64 for a, b in spans[:-1]) and 32 <= spans[-1][1] - spans[-1][0] < 96  # short tail joined
    for seg in segments[1:]:  # later windows see context before the chunks they own
        assert seg.token_span[0] < seg.group_spans[0][0]
        for (a, b), (pa, pb) in zip(seg.group_spans, seg.groups):
            assert seg.ids[pa:pb] == emb.tokenize([LONG], offsets=False)[0][0][a:b]


def test_chunk_vector_is_the_mean_of_its_tokens_in_full_context(minilm):
    emb = late(minilm)
    stored = emb.encode_document_windows(DOCS)
    seg = emb.document_segments([LONG])[1]
    states = token_states(emb, seg)  # (T, H): one forward pass over the whole window
    rows = np.flatnonzero(stored.text_index == 0)
    first = int(np.flatnonzero([s == seg.group_spans[0] for s in map(tuple, stored.token_spans[rows])])[0])
    a, b = seg.groups[0]
    expected = torch.nn.functional.normalize(states[a:b].mean(0), dim=-1).numpy()
    np.testing.assert_allclose(stored.vectors[rows[first]], expected, atol=1e-5)
    # the same tokens embedded alone (no context) give another vector: the context is what late chunking adds
    alone = emb.encode_document_windows([emb.tokenizer.decode(seg.ids[a:b])]).vectors[0]
    assert float(alone @ expected) < 0.999


def test_late_chunks_batched_equal_single_and_spans_point_into_the_text(minilm):
    emb = late(minilm)
    stored = emb.encode_document_windows(DOCS)
    assert list(np.bincount(stored.text_index)) == [len(s) for s in
                                                    [[g for seg in emb.document_segments([d]) for g in seg.groups]
                                                     for d in DOCS]]
    for i, doc in enumerate(DOCS):
        alone = emb.encode_document_windows([doc])
        np.testing.assert_allclose(alone.vectors, stored.vectors[stored.text_index == i], atol=1e-5)
        assert list(alone.chunk_index) == list(range(len(alone.chunk_index)))
    a, b = stored.char_spans[stored.text_index == 0][1]
    assert LONG[a:b].split()[0].startswith(("w", "token"))  # the second chunk's text
    with pytest.raises(ValueError, match="late_chunk"):
        emb.encode_documents(DOCS)  # several chunks: no single vector
    assert emb.encode_documents(DOCS[1:2]).shape == (1, 384)  # one chunk: its vector


def test_late_chunk_needs_mean_pooling(minilm):
    with pytest.raises(ConfigError, match="late_chunk"):
        Embedder(EmbedderConfig(pooling="cls", documents={"windows": "late_chunk"}), backbone=minilm.backbone)


def test_window_score_aggregations():
    scores = np.array([[0.9, 0.1, 0.5, 0.2, 0.6]])  # doc 0: windows 0-2, doc 1: windows 3-4
    index = np.array([0, 0, 0, 1, 1])
    np.testing.assert_allclose(window_scores(scores, index, "best"), [[0.9, 0.6]])
    np.testing.assert_allclose(window_scores(scores, index, "first_prior", first_weight=0.5), [[0.9, 0.4]])
    soft = window_scores(scores, index, "softmax", temperature=0.1)
    assert 0.5 < soft[0, 0] < 0.9 and 0.2 < soft[0, 1] < 0.6
    np.testing.assert_allclose(window_scores(scores, index, "softmax", temperature=1e-4), [[0.9, 0.6]], atol=1e-6)
    one = np.array([[0.3, 0.7]])  # one window per document: the scores themselves
    np.testing.assert_allclose(window_scores(one, np.array([0, 1]), "first_prior"), one)


def test_aggregation_is_a_search_setting_not_part_of_the_vectors():
    from diffembed.index.fingerprint import differences

    a = EmbedderConfig(documents={"windows": "late_chunk"}).embedding_function()
    b = EmbedderConfig(documents={"windows": "late_chunk", "aggregate": "softmax"}).embedding_function()
    c = EmbedderConfig(documents={"windows": "late_chunk", "chunk_tokens": 64}).embedding_function()
    assert b["documents"]["aggregate"] == "softmax"  # saved with a model
    wrap = lambda f: {"function": f}  # noqa: E731
    assert differences(wrap(a), wrap(b)) == [] and differences(wrap(a), wrap(c))
    assert "chunk_tokens" not in EmbedderConfig(documents={"windows": "best"}).embedding_function()["documents"]


# ----------------------------------------------------------------------------------- mask-token readout


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_mask_readout_pools_the_appended_mask_tokens(model_path, family):
    emb = Embedder(EmbedderConfig(model=model_path(family), pooling="mask", mask_tokens=4))
    mask_id = emb.model.config.mask_token_id
    seg = emb.query_segments(["what is late chunking"])[0]
    positions = [i for i, t in enumerate(seg.ids) if t == mask_id]
    assert len(positions) == 4 and [i for i, m in enumerate(seg.pool_mask) if m] == positions
    states = token_states(emb, seg)
    expected = torch.nn.functional.normalize(states[positions].mean(0), dim=-1).numpy()
    np.testing.assert_allclose(emb.encode_queries(["what is late chunking"])[0], expected, atol=1e-5)
    batched = emb.encode_documents(DOCS[1:])
    single = np.concatenate([emb.encode_documents([d]) for d in DOCS[1:]])
    np.testing.assert_allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_mask_multivector_is_each_mask_tokens_state(model_path, family):
    emb = Embedder(EmbedderConfig(model=model_path(family), pooling="mask", mask_tokens=3, mask_vectors="multi"))
    queries = emb.encode_queries(["one query", "another, longer query text"])
    docs = emb.encode_documents(DOCS[1:])
    assert queries.shape == (2, 3, emb.dimension) and docs.shape == (3, 3, emb.dimension)
    np.testing.assert_allclose(np.linalg.norm(docs, axis=-1), 1.0, atol=1e-5)
    seg = emb.query_segments(["one query"])[0]
    states = token_states(emb, seg)
    expected = torch.nn.functional.normalize(torch.stack([states[a] for a, _ in seg.groups]), dim=-1).numpy()
    np.testing.assert_allclose(queries[0], expected, atol=1e-5)
    np.testing.assert_allclose(emb.encode_documents([DOCS[2]])[0], docs[1], atol=1e-4)  # batched == single
    assert emb.forward(emb.collate(emb.query_segments(["a", "b c"]))).shape == (2, 3, emb.dimension)
    mean = Embedder(EmbedderConfig(model=model_path(family), pooling="mask", mask_tokens=3), backbone=emb.backbone)
    pooled = emb.embed_segments([seg]).mean(0)  # the multivector's mean state is the `mean` readout
    np.testing.assert_allclose(mean.encode_queries(["one query"])[0],
                               torch.nn.functional.normalize(pooled, dim=-1).numpy(), atol=1e-5)


def test_mask_readout_needs_a_mask_token_and_a_fitting_policy(model_path):
    with pytest.raises(ConfigError, match="mask token"):
        Embedder(EmbedderConfig(model=model_path("qwen2"), pooling="mask"))
    with pytest.raises(ConfigError, match="multivector per window"):
        EmbedderConfig.from_dict({"pooling": "mask", "mask_vectors": "multi", "documents": {"windows": "mean"}})
    assert "mask_tokens" in EmbedderConfig(pooling="mask").embedding_function()
    assert "mask_tokens" not in EmbedderConfig().embedding_function()


def test_warm_up_runs_under_a_multi_point_policy(minilm):
    """Serve replicas warm up (compile: true) on a long text: a late-chunked policy must not refuse it."""
    late(minilm).warm_up()
