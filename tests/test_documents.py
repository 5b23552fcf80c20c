"""The one document policy and exact instruction exclusion, across tokenizer kinds and every path.

Paths that must agree for the same document and setting: the batch job's stored points, the evaluation's
vectors, and the serving encoder's vector (its deployment body, `EncoderImpl`; tests/test_serve.py checks
the same over HTTP /v1/embeddings).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.documents import DocumentPolicy, best_hits, best_window_scores

INSTRUCTION = "Given a web search query, retrieve relevant passages"


def content(emb: Embedder, seg):
    """(content ids, their pool mask) of a segment, special tokens stripped."""
    n_pre, n_suf = (len(ids) for ids in emb.special_tokens)
    end = len(seg.ids) - n_suf
    return seg.ids[n_pre:end], seg.pool_mask[n_pre:end]


@pytest.mark.parametrize("family", ["bert", "dream", "qwen2", "llama", "mistral", "llada"])
def test_instruction_excluded_on_token_boundaries(family, model_path):
    """The query's first word is pooled, the instruction's last token is not, a one-token query works."""
    emb = Embedder(EmbedderConfig(model=model_path(family), attention="bidirectional", pooling="mean",
                                  query_instruction=INSTRUCTION, exclude_instruction_from_pooling=True))
    for query in ("the quick brown fox", "the", "fox"):
        seg = emb.query_segments([query])[0]
        ids, mask = content(emb, seg)
        pooled = [t for t, m in zip(ids, mask) if m]
        instruction = [t for t, m in zip(ids, mask) if not m]
        assert mask == [0] * len(instruction) + [1] * len(pooled)  # instruction first, then the whole query
        # exactly the query's tokens are pooled, exactly the instruction's are not
        assert emb.tokenizer.decode(pooled).strip().lower() == query
        assert emb.tokenizer.decode(instruction).replace(" ", "").lower().endswith("query:")
        assert len(emb.encode_queries([query])[0]) == emb.dimension
    # excluding changes only pooling, not tokenisation: the same ids either way
    incl = Embedder(emb.config.model_copy(update={"exclude_instruction_from_pooling": False}), backbone=emb.backbone)
    seg_in, seg_ex = incl.query_segments(["the fox"])[0], emb.query_segments(["the fox"])[0]
    assert seg_in.ids == seg_ex.ids and all(seg_in.pool_mask)


def test_byte_level_query_keeps_its_leading_space_token(model_path):
    """Byte-level BPE: the first query word is tokenised as in running text ('Ġthe'), not split from it."""
    emb = Embedder(EmbedderConfig(model=model_path("dream"), query_instruction=INSTRUCTION,
                                  exclude_instruction_from_pooling=True))
    ids, mask = content(emb, emb.query_segments(["the quick brown fox"])[0])
    first = ids[mask.index(1)]
    assert emb.tokenizer.convert_ids_to_tokens(first) == "Ġthe"


def test_query_with_no_room_left_is_a_clear_error(minilm):
    emb = Embedder(EmbedderConfig(max_length=8, query_instruction=INSTRUCTION), backbone=minilm.backbone)
    with pytest.raises(ValueError, match=r"queries\[0\] has no tokens left after the instruction"):
        emb.encode_queries(["hello"])


def test_title_join_and_prefix_on_every_window(minilm):
    policy = {"windows": "best", "overlap": 4, "prefix": "passage: "}
    emb = Embedder(EmbedderConfig(max_length=24, documents=policy), backbone=minilm.backbone)
    text = " ".join(f"word{i}" for i in range(60))
    segs = emb.document_segments([text], ["A Title"])
    assert len(segs) > 2
    prefix_ids = minilm.tokenizer("passage: ", add_special_tokens=False)["input_ids"]
    for seg in segs:  # the prefix opens every window, not only the first
        assert content(emb, seg)[0][: len(prefix_ids)] == prefix_ids
    assert "a title" in emb.tokenizer.decode(content(emb, segs[0])[0])
    assert "a title" not in emb.tokenizer.decode(content(emb, segs[1])[0])
    # char spans point into the text, the joined title excluded
    s, e = segs[0].char_span
    assert text[s:e].startswith("word0")
    # `title: ignore` embeds the text only; `prepend` equals embedding the joined string
    plain = Embedder(EmbedderConfig(), backbone=minilm.backbone)
    ignore = Embedder(EmbedderConfig(documents={"title": "ignore"}), backbone=minilm.backbone)
    np.testing.assert_allclose(plain.encode_documents(["body text"], ["Head"]),
                               plain.encode_documents(["Head body text"]), atol=1e-6)
    np.testing.assert_allclose(ignore.encode_documents(["body text"], ["Head"]),
                               plain.encode_documents(["body text"]), atol=1e-6)


def test_windows_policy_first_mean_best(minilm):
    long_doc = " ".join(f"sentence {i} is about topic {i % 5}." for i in range(30))
    docs = ["short text", long_doc]
    made = {w: Embedder(EmbedderConfig(max_length=32, documents={"windows": w, "overlap": 8}),
                        backbone=minilm.backbone) for w in ("first", "mean", "best")}
    first, mean, best = (made[w].encode_document_windows(docs) for w in ("first", "mean", "best"))
    assert list(first.text_index) == list(mean.text_index) == [0, 1]  # one stored vector per document
    assert list(best.text_index[:1]) == [0] and (best.text_index == 1).sum() > 2  # one per window
    # the stored vector is what encode_documents gives (first, mean)
    for w, stored in (("first", first), ("mean", mean)):
        np.testing.assert_allclose(stored.vectors, made[w].encode_documents(docs), atol=1e-6)
    # a `mean` document's row spans all of its windows; `first` only the first
    n_tokens = len(minilm.tokenizer(long_doc, add_special_tokens=False)["input_ids"])
    assert tuple(mean.token_spans[1]) == (0, n_tokens) and first.token_spans[1][1] < n_tokens
    # the first window is the same vector under every policy
    np.testing.assert_allclose(first.vectors[1], best.vectors[best.text_index == 1][0], atol=1e-6)
    np.testing.assert_allclose(first.vectors[0], mean.vectors[0], atol=1e-6)


def test_best_window_helpers():
    scores = np.array([[0.1, 0.9, 0.2, 0.3], [0.5, 0.1, 0.1, 0.7]])
    np.testing.assert_allclose(best_window_scores(scores, np.array([0, 0, 1, 1])), [[0.9, 0.3], [0.5, 0.7]])

    class Hit:
        def __init__(self, doc_id, score):
            self.doc_id, self.score = doc_id, score

    hits = [Hit("a", 0.9), Hit("a", 0.8), Hit("b", 0.7), Hit("c", 0.6), Hit("b", 0.5)]
    assert [(h.doc_id, h.score) for h in best_hits(hits, 2)] == [("a", 0.9), ("b", 0.7)]


def test_policy_config_and_legacy_keys(tmp_path):
    cfg = EmbedderConfig.from_dict({"long_inputs": "chunk", "chunk_overlap": 16, "document_prefix": "passage: "})
    assert cfg.documents == DocumentPolicy(windows="mean", overlap=16, prefix="passage: ")
    assert EmbedderConfig.from_dict({}, ["documents.windows=best"]).documents.windows == "best"
    with pytest.raises(ConfigError, match="documents.windows"):
        EmbedderConfig.from_dict({}, ["documents.windows=all"])
    with pytest.raises(ConfigError, match="overlap"):
        EmbedderConfig.from_dict({"max_length": 32, "documents": {"windows": "best", "overlap": 16}})
    from diffembed.batch.config import EmbedCorpusConfig

    with pytest.raises(ConfigError, match="embedder.documents.windows"):
        EmbedCorpusConfig.from_dict({"input": {"paths": ["x.jsonl"]}, "encode": {"long_documents": "chunk"}})


def test_cls_pooling_with_causal_attention_is_a_config_error(model_path):
    with pytest.raises(ConfigError, match="cls pooling with causal attention"):
        EmbedderConfig.from_dict({"attention": "causal", "pooling": "cls"})
    with pytest.raises(ConfigError, match="cls pooling with causal attention"):  # causal by the family default
        Embedder(EmbedderConfig(model=model_path("qwen2"), pooling="cls"))
    Embedder(EmbedderConfig(model=model_path("qwen2"), attention="bidirectional", pooling="cls"))  # fine


# ------------------------------------------------------------------------------- the same vector on every path


@pytest.mark.parametrize("windows", ["first", "mean", "best"])
def test_batch_job_equals_evaluation_equals_served(windows, ray_cluster, tmp_path, minilm):
    """The batch job's stored points == the evaluation's vectors == the encoder deployment's vectors."""
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus
    from diffembed.eval.beir import RetrievalData
    from diffembed.eval.runner import stored_vectors
    from diffembed.serving.encoder import EncoderImpl
    from test_embed_corpus import all_points

    embedder_cfg = {"model": "all-MiniLM-L6-v2", "max_length": 32,
                    "documents": {"windows": windows, "overlap": 8, "prefix": "passage: "}}
    docs = [
        {"id": "short", "text": "The harbour is calm at night.", "title": "Harbour"},
        {"id": "long", "text": " ".join(f"Line {i} of a long report on glaciers." for i in range(20)), "title": "Ice"},
        {"id": "plain", "text": "A document without a title."},
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    store = {"path": str(tmp_path / "qdrant"), "collection": "docs"}
    embed_corpus(EmbedCorpusConfig.from_dict({
        "embedder": embedder_cfg, "input": {"paths": [str(corpus)], "title_column": "title"},
        "encode": {"actors": 1, "batch_size": 2}, "store": store}), progress=False)
    points: dict[str, list] = {}
    for p in all_points(tmp_path / "qdrant").values():
        points.setdefault(p["payload"]["doc_id"], []).append((p["payload"]["chunk_index"], p["vector"]["dense"]))
    stored = {d: np.array([v for _, v in sorted(rows)]) for d, rows in points.items()}

    emb = Embedder(EmbedderConfig.model_validate(embedder_cfg), backbone=minilm.backbone)
    data = RetrievalData("t", corpus={d["id"]: d["text"] for d in docs}, queries={}, qrels={},
                         titles={d["id"]: d["title"] for d in docs if "title" in d})
    ids, evaluated = stored_vectors(emb, data)
    for i, doc_id in enumerate(ids):
        np.testing.assert_allclose(stored[doc_id], evaluated.vectors[evaluated.text_index == i], atol=1e-5)
    assert len(stored["long"]) == (1 if windows != "best" else (evaluated.text_index == 1).sum()) > 0

    encoder = EncoderImpl(embedder_cfg)
    joined = [f"{d['title']} {d['text']}" if "title" in d else d["text"] for d in docs]  # the policy's join
    served = encoder.embed_unbatched(joined if windows != "best" else [joined[0], joined[2]], kind="document",
                                     truncate=windows == "first")  # mean never truncates
    if windows != "best":
        for doc, vector in zip(docs, served.vectors):
            np.testing.assert_allclose(vector, stored[doc["id"]][0], atol=1e-5)
        default = encoder.embed_unbatched(joined, kind="document", truncate=True)  # the service's default
        for doc, vector in zip(docs, default.vectors):
            np.testing.assert_allclose(vector, stored[doc["id"]][0], atol=1e-5)
    else:  # one-window documents agree; a multi-window one has no single vector unless truncated to window 0
        np.testing.assert_allclose(served.vectors[0], stored["short"][0], atol=1e-5)
        np.testing.assert_allclose(served.vectors[1], stored["plain"][0], atol=1e-5)
        from diffembed.serving.encoder import InputTooLong

        with pytest.raises(InputTooLong, match="windows"):
            encoder.embed_unbatched([joined[1]], kind="document", truncate=False)
        first = encoder.embed_unbatched([joined[1]], kind="document", truncate=True)
        np.testing.assert_allclose(first.vectors[0], stored["long"][0], atol=1e-5)


def test_batch_job_and_beir_evaluation_read_a_document_alike(ray_cluster, tmp_path, model_path):
    """Surrounding whitespace, a blank title and a title-only document: the batch job and the BEIR reader take a
    row's text and title by one rule (`documents.document_fields`), so a byte-level BPE model, for which
    whitespace is tokens, stores on one path the vectors the other evaluates."""
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus
    from diffembed.eval.beir import load_beir
    from diffembed.eval.runner import stored_vectors
    from test_embed_corpus import all_points

    docs = [
        {"_id": "padded", "title": "  Harbour \n", "text": "\n  The harbour is calm at night.  \n"},
        {"_id": "title-only", "title": "Glaciers of the north", "text": "   "},
        {"_id": "blank-title", "title": "   ", "text": "A document whose title is blank."},
    ]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "calm harbour"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\tpadded\t1\n")
    embedder_cfg = {"model": model_path("qwen2"), "max_length": 32}
    embed_corpus(EmbedCorpusConfig.from_dict({
        "embedder": embedder_cfg, "input": {"paths": [str(beir / "corpus.jsonl")], "id_column": "_id",
                                            "title_column": "title"},
        "encode": {"actors": 1, "batch_size": 2}, "store": {"path": str(tmp_path / "q"), "collection": "docs"}}),
        progress=False)
    stored = {p["payload"]["doc_id"]: np.asarray(p["vector"]["dense"]) for p in all_points(tmp_path / "q").values()}

    ids, evaluated = stored_vectors(Embedder(EmbedderConfig.model_validate(embedder_cfg)), load_beir(beir, "test"))
    assert sorted(stored) == sorted(ids) == ["blank-title", "padded", "title-only"]  # the title-only one too
    for i, doc_id in enumerate(ids):
        (vector,) = evaluated.vectors[evaluated.text_index == i]
        np.testing.assert_allclose(stored[doc_id] / np.linalg.norm(stored[doc_id]), vector / np.linalg.norm(vector),
                                   atol=1e-5)
