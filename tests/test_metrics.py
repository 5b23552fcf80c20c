"""Retrieval metrics: hand-derived values on a small run, and agreement with calling pytrec_eval directly."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import pytrec_eval

from diffembed.eval.metrics import dense_run, evaluate, top_k_run, top_ranked

QRELS = {
    "q1": {"d1": 1},
    "q2": {"d3": 2, "d4": 1},
    "q3": {"d9": 1},
}
RUN = {
    "q1": {"d2": 0.9, "d1": 0.8, "d3": 0.1},  # relevant at rank 2
    "q2": {"d3": 0.9, "d5": 0.5, "d4": 0.4},  # grade 2 at rank 1, grade 1 at rank 3
    # relevant at rank 12: outside MRR@10 and Recall@10, inside Recall@100
    "q3": {**{f"x{i:02d}": 1.0 - i / 100 for i in range(11)}, "d9": 0.5},
}


def test_hand_computed_values():
    m = evaluate(QRELS, RUN)
    # nDCG@1: only q2 has a relevant document first
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    # nDCG@10 (trec_eval: gain = grade, discount log2(rank + 1)):
    #   q1 = (1/log2 3) / 1;  q2 = (2 + 1/log2 4) / (2 + 1/log2 3);  q3 = 0
    q1 = 1 / math.log2(3)
    q2 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((q1 + q2 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 12) / 3)  # uncut reciprocal rank still sees rank 12
    assert m["recall@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["recall@100"] == pytest.approx(1.0)


def test_query_missing_from_run_counts_as_zero():
    qrels = {**QRELS, "q4": {"d7": 1}}
    with_q4 = evaluate(qrels, RUN)
    without = evaluate(QRELS, RUN)
    for key in ("ndcg@1", "ndcg@10", "mrr@10", "recall@100"):
        assert with_q4[key] == pytest.approx(without[key] * 3 / 4)


def test_mrr_at_10_cuts_ties_as_trec_eval_ranks_them():
    # 11 documents with one score: trec_eval ranks ties by doc id descending, so "a" is 11th and "z" first
    tied = {d: 1.0 for d in "abcdefghijz"}
    assert evaluate({"q": {"a": 1}}, {"q": tied})["mrr@10"] == 0.0
    assert evaluate({"q": {"a": 1}}, {"q": tied})["mrr"] == pytest.approx(1 / 11)
    assert evaluate({"q": {"z": 1}}, {"q": tied})["mrr@10"] == 1.0
    assert list(top_ranked({"q": {"b": 0.5, "c": 0.5, "a": 0.9}}, 2)["q"]) == ["a", "c"]


def test_matches_pytrec_eval_directly():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(200)]
    qrels = {f"q{i}": {d: rng.choice([1, 2]) for d in rng.sample(docs, rng.randint(1, 4))} for i in range(30)}
    run = {q: {d: rng.random() for d in rng.sample(docs, 150)} for q in qrels}
    ours = evaluate(qrels, run)
    direct = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,10", "recall.10,100", "recip_rank"}).evaluate(run)
    for ours_key, trec_key in (("ndcg@1", "ndcg_cut_1"), ("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"),
                               ("recall@100", "recall_100"), ("mrr", "recip_rank")):
        assert ours[ours_key] == pytest.approx(np.mean([v[trec_key] for v in direct.values()]))
    # MRR@10 by hand from the ranking: 1/rank of the first relevant document within the top 10, else 0
    expected = []
    for q, docs_scores in run.items():
        ranked = sorted(docs_scores, key=docs_scores.get, reverse=True)[:10]
        ranks = [r for r, d in enumerate(ranked, start=1) if qrels[q].get(d, 0) > 0]
        expected.append(1 / ranks[0] if ranks else 0.0)
    assert ours["mrr@10"] == pytest.approx(np.mean(expected))
    assert 0 < ours["mrr@10"] < ours["mrr"]  # some first hits lie below rank 10 in this run


def test_dense_run_returns_the_top_k_by_inner_product():
    rng = np.random.default_rng(0)
    queries, docs = rng.normal(size=(3, 8)), rng.normal(size=(20, 8))
    run = dense_run(queries, docs, ["a", "b", "c"], [f"d{i}" for i in range(20)], top_k=5)
    for i, q in enumerate("abc"):
        best = np.argsort(-(queries[i] @ docs.T))[:5]
        assert set(run[q]) == {f"d{j}" for j in best}
    assert top_k_run(np.zeros((2, 0)), ["a", "b"], [], 10) == {"a": {}, "b": {}}
