"""The offline development benchmark: deterministic, BEIR-readable, one relevant document per query, splits
disjoint, training pairs the train job reads, near-duplicates dropped."""

from __future__ import annotations

import json

import pytest

from diffembed.eval.beir import load_beir
from diffembed.eval.devbench import DevbenchConfig, DocItem, build, deduplicate, main, split_docstring
from diffembed.train.data import load_pairs

SLICE = ["json", "textwrap", "difflib", "statistics", "argparse", "fractions", "heapq", "shutil", "zipfile"]


def small(**kw) -> DevbenchConfig:
    return DevbenchConfig(modules=SLICE, docs=40, test=12, dev=6, train=10, min_words=20, **kw)


def test_build_is_deterministic_and_well_formed(tmp_path):
    stats = build(small(), tmp_path / "a")
    build(small(), tmp_path / "b")
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/dev.tsv", "train.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert stats["documents"] == 40 and stats["test_queries"] == 12 and stats["dev_queries"] == 6
    assert stats["train_pairs"] == 10

    test, dev = load_beir(tmp_path / "a", "test"), load_beir(tmp_path / "a", "dev")
    assert len(test.corpus) == 40 and len(test.queries) == 12 and len(dev.queries) == 6
    assert all(len(docs) == 1 for docs in test.qrels.values())  # one relevant document per query
    test_docs = {d for docs in test.qrels.values() for d in docs}
    dev_docs = {d for docs in dev.qrels.values() for d in docs}
    assert not test_docs & dev_docs
    for qid, docs in {**test.qrels, **dev.qrels}.items():
        (doc,) = docs
        query = (test.queries | dev.queries)[qid]
        body = test.corpus[doc].split("\n\n")[1]
        assert " ".join(body.split()) != query  # the summary is the query; the document starts after it
        assert doc in test.corpus[doc].split("\n", 1)[0]  # the document opens with its name (and signature)

    pairs, bad = load_pairs([str(tmp_path / "a" / "train.jsonl")], "jsonl", 0, "fail")
    assert len(pairs) == 10
    corpus_texts = set(test.corpus.values())
    assert not any(p.positive in corpus_texts for p in pairs)  # training documents are outside the corpus


def test_too_few_documents_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="usable documents"):
        build(DevbenchConfig(modules=["json"], docs=500, test=10, dev=5, train=0), tmp_path)
    assert main([str(tmp_path / "x"), "--docs", "5", "--test", "4", "--dev", "2"]) == 2  # test + dev > docs


def test_near_duplicates_and_repeated_summaries_are_dropped():
    body = " ".join(f"word{i}" for i in range(60))
    items = [
        DocItem("m.a", "Do the first thing.", f"m.a()\n\n{body}", 60),
        DocItem("m.b", "Do another thing.", f"m.b()\n\n{body} extra", 61),  # near-duplicate body
        DocItem("m.c", "Do the first thing.", "m.c()\n\n" + " ".join(f"other{i}" for i in range(60)), 60),  # same query
        DocItem("m.d", "Something else entirely.", "m.d()\n\n" + " ".join(f"x{i}" for i in range(60)), 60),
    ]
    assert [i.id for i in deduplicate(items)] == ["m.a", "m.d"]


def test_split_docstring_takes_a_c_signature_line_apart():
    assert split_docstring("add(x1, x2, /)\n\nAdd arguments.\n\nMore text.") == (
        "add(x1, x2, /)", "Add arguments.", "More text.")
    assert split_docstring("Summary on\ntwo lines.\n\nBody.") == ("", "Summary on two lines.", "Body.")


def test_cli_writes_stats(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffembed.eval.devbench.MODULES", SLICE)
    assert main([str(tmp_path), "--docs", "30", "--test", "8", "--dev", "4", "--train", "5", "--min-words", "20"]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["documents"] == 30 and json.loads(capsys.readouterr().out) == stats
