"""LongEmbed-style synthetic tasks: one answer per query, exact token lengths, deterministic per seed."""

from __future__ import annotations

import re

import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.eval.config import EvalConfig, TaskConfig
from diffembed.eval.synthetic import needle_task, passkey_task, synthetic_tasks, token_length


@pytest.fixture(scope="module")
def tokenizers(minilm, model_path):
    """A WordPiece tokenizer (MiniLM) and a byte-level BPE one (the tiny Dream checkpoint's Qwen2 tokenizer)."""
    return {"minilm": minilm.tokenizer, "dream": Embedder(EmbedderConfig(model=model_path("dream"))).tokenizer}


def check_one_answer_each(data, answer_in_doc):
    """Each query has exactly one relevant document, its own; its answer is in that document and in no other."""
    relevant = [next(iter(judged)) for judged in data.qrels.values()]
    assert all(len(judged) == 1 and list(judged.values()) == [1] for judged in data.qrels.values())
    assert len(set(relevant)) == len(relevant) == len(data.queries)
    assert set(data.qrels) == set(data.queries)
    for qid, doc_id in zip(data.qrels, relevant):
        answer = answer_in_doc(data, qid)
        holders = [d for d, text in data.corpus.items() if answer in text]
        assert holders == [doc_id], (qid, answer, holders)


@pytest.mark.parametrize("which", ["minilm", "dream"])
@pytest.mark.parametrize("length", [128, 300, 1024])
def test_passkey_documents(tokenizers, which, length):
    tok = tokenizers[which]
    data = passkey_task(tok, length, n_queries=6, n_documents=12, seed=3)
    assert len(data.corpus) == 12 and len(data.queries) == 6
    for text in data.corpus.values():  # the requested length, in this tokenizer's tokens (no special tokens)
        assert abs(token_length(tok, text) - length) <= max(1, length // 100)
    check_one_answer_each(data, lambda d, q: d.meta["needles"][q])  # the whole pass-key sentence
    keys = data.meta["answers"]
    assert len(set(keys.values())) == 6 and all(re.fullmatch(r"\d{5}", k) for k in keys.values())
    for qid, doc_id in ((q, next(iter(j))) for q, j in data.qrels.items()):
        name = re.match(r"What is the pass key for (.+)\?$", data.queries[qid]).group(1)
        assert f"{name}'s pass key is {keys[qid]}" in data.corpus[doc_id]
        # the key itself appears in no other document (filler has no digits)
        assert [d for d, t in data.corpus.items() if keys[qid] in t] == [doc_id]


@pytest.mark.parametrize("which", ["minilm", "dream"])
def test_needle_documents(tokenizers, which):
    tok = tokenizers[which]
    data = needle_task(tok, 512, n_queries=8, n_documents=10, seed=1)
    for text in data.corpus.values():
        assert abs(token_length(tok, text) - 512) <= 5
    check_one_answer_each(data, lambda d, q: d.meta["needles"][q])
    for qid, judged in data.qrels.items():
        town = re.search(r" in ([A-Z][a-z]+)\?$", data.queries[qid]).group(1)
        assert [d for d, t in data.corpus.items() if town in t] == list(judged)  # one town, one document
    depths = list(data.meta["depths"].values())
    assert min(depths) < 128 and max(depths) > 256  # needles at different depths, not all at the start


def test_deterministic_per_seed(minilm):
    tok = minilm.tokenizer
    for generate in (passkey_task, needle_task):
        a, b = generate(tok, 256, 5, 10, seed=7), generate(tok, 256, 5, 10, seed=7)
        assert (a.corpus, a.queries, a.qrels) == (b.corpus, b.queries, b.qrels)
        c = generate(tok, 256, 5, 10, seed=8)
        assert c.corpus != a.corpus and c.queries != a.queries


def test_synthetic_tasks_one_dataset_per_length(minilm):
    task = TaskConfig(name="pk", kind="passkey", lengths=[64, 200], queries_per_length=3, documents_per_length=4)
    datasets = synthetic_tasks(task, minilm.tokenizer)
    assert [d.name for d in datasets] == ["pk@64", "pk@200"]
    assert [d.meta["length"] for d in datasets] == [64, 200]
    assert [token_length(minilm.tokenizer, t) for t in datasets[1].corpus.values()] == [200] * 4


def test_impossible_sizes_are_one_line_errors(minilm):
    with pytest.raises(ConfigError, match="cannot hold its .*-token inserted sentence"):
        passkey_task(minilm.tokenizer, 16, 1, 2)
    with pytest.raises(ConfigError, match="at most .* documents per length"):
        needle_task(minilm.tokenizer, 64, 1, 100_000)
    with pytest.raises(ConfigError, match="queries_per_length .* exceeds documents_per_length"):
        EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "passkey", "queries_per_length": 5,
                                         "documents_per_length": 4}]})
    with pytest.raises(ConfigError, match="path is only for beir tasks"):
        EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "needle", "path": "x"}]})
    with pytest.raises(ConfigError, match="may not contain '@'"):
        EvalConfig.from_dict({"tasks": [{"name": "p@1", "kind": "needle"}]})
