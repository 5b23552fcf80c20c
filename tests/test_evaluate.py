"""The evaluation job end to end: BEIR loading, exact and Qdrant-backed retrieval, reports, CLI errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.eval.beir import load_beir
from diffembed.eval.config import EvalConfig
from diffembed.eval.metrics import evaluate
from diffembed.eval.report import comparison_table, load_results
from diffembed.eval.runner import collection_name, exact_run, run_evaluation, search_run, store_config
from diffembed.eval.synthetic import passkey_task

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "configs" / "data" / "beir_sample"
EVALUATE = ROOT / "jobs" / "evaluate.py"
METRICS = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "mrr@10")


def config(tmp_path: Path, *overrides: str, **sections) -> EvalConfig:
    data = {
        "name": "t",
        "embedder": {"model": "all-MiniLM-L6-v2"},
        "tasks": [
            {"name": "sample", "kind": "beir", "path": str(SAMPLE)},
            {"name": "passkey", "kind": "passkey", "lengths": [64, 256], "queries_per_length": 5,
             "documents_per_length": 10},
            {"name": "needle", "kind": "needle", "lengths": [128], "queries_per_length": 5,
             "documents_per_length": 10},
        ],
        "output_dir": str(tmp_path / "out"),
        **sections,
    }
    return EvalConfig.from_dict(data, list(overrides))


def copy_sample(tmp_path: Path) -> Path:
    dest = tmp_path / "beir"
    shutil.copytree(SAMPLE, dest)
    return dest


# ------------------------------------------------------------------------------------------- BEIR loading


def test_beir_sample_loads_judged_queries_of_the_split():
    test = load_beir(SAMPLE, "test")
    assert len(test.queries) == 18 and set(test.queries) == set(test.qrels)
    assert "q23" not in test.queries and "q19" not in test.queries  # no judgement / judged in dev only
    assert test.corpus["d01"].startswith("Plants convert sunlight")  # text and title apart: the policy joins them
    assert test.titles["d01"] == "Photosynthesis"
    assert test.qrels["q02"] == {"d04": 2, "d03": 1}
    dev = load_beir(SAMPLE, "dev", max_queries=2)
    assert list(dev.queries) == ["q19", "q20"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "qrels" / "test.tsv").open("a").write("q99\td01\t1\n"),
         r"qrels/test.tsv:\d+: query id 'q99' is not in queries.jsonl"),
        (lambda d: (d / "qrels" / "test.tsv").open("a").write("q01\tnope\t1\n"),
         r"qrels/test.tsv:\d+: corpus id 'nope' is not in corpus.jsonl"),
        (lambda d: (d / "qrels" / "test.tsv").open("a").write("q01\td02\thigh\n"),
         r"qrels/test.tsv:\d+: score 'high' is not a number"),
        (lambda d: (d / "corpus.jsonl").open("a").write('{"_id": "d99", "text": oops}\n'),
         r"corpus.jsonl:38: malformed JSON line"),
        (lambda d: (d / "queries.jsonl").write_text("\n"), r"queries.jsonl: no queries"),
        (lambda d: (d / "qrels" / "test.tsv").rename(d / "qrels" / "eval.tsv"),
         r"no split 'test' .*\(available: dev, eval\)"),
        (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq01\td01\t0\n"),
         r"test.tsv: no query has a relevant document in split 'test'"),
    ],
)
@pytest.mark.parametrize("texts", [True, False], ids=["texts", "ids-only"])
def test_bad_beir_data_is_one_line_error(tmp_path, damage, message, texts):
    root = copy_sample(tmp_path)
    damage(root)
    with pytest.raises(ConfigError, match=message) as info:
        load_beir(root, "test", texts=texts)
    assert "\n" not in str(info.value)


def test_read_without_texts_holds_the_same_documents_but_no_text(tmp_path):
    """The store backend's read: the same retrievable documents, judged queries and size, no texts; the batch
    job's input reads the corpus file itself, unless the file's first row lacks a column the job then checks."""
    from diffembed.eval.runner import load_tasks

    root = copy_sample(tmp_path)
    with (root / "corpus.jsonl").open("a") as f:  # no text but a title: the title; neither: not retrievable
        f.write(json.dumps({"_id": "d-null", "title": "Solar panels", "text": None}) + "\n")
        f.write(json.dumps({"_id": "d-empty", "title": " ", "text": "  "}) + "\n")
    full, ids_only = load_beir(root, "test"), load_beir(root, "test", texts=False)
    assert ids_only.corpus is None and ids_only.titles == {}
    assert ids_only.text_ids == full.text_ids and "d-null" in full.text_ids and "d-empty" not in full.text_ids
    assert ids_only.size == full.size == len(full.corpus) and full.corpus["d-null"] == "Solar panels"
    assert (ids_only.queries, ids_only.qrels) == (full.queries, full.qrels)
    assert ids_only.batch_input == {"paths": [str(root / "corpus.jsonl")], "format": "jsonl", "id_column": "_id",
                                    "text_column": "text", "title_column": "title", "bad_rows": "skip"}

    rows = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    del rows[0]["title"]  # the job would refuse title_column=title, and without it would drop every title
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig.from_dict({"tasks": [{"name": "b", "kind": "beir", "path": str(root)}],
                                "retrieval": {"backend": "qdrant"}})
    scored, _ = load_tasks(cfg)
    assert scored["b"].batch_input is None and scored["b"].corpus is not None  # the texts are held and written
    assert scored["b"].text_ids == full.text_ids

    # a remote evaluation (a GPU node) of a local folder: the folder is on this machine, the texts travel along;
    # of a URI: the task's batch job reads it where it runs
    for path, held in [(SAMPLE, True), (f"file://{SAMPLE}", False)]:
        remote = EvalConfig.from_dict({"tasks": [{"name": "b", "kind": "beir", "path": str(path)}],
                                       "retrieval": {"backend": "qdrant"}, "compute": {"resources": {"gpu_pool": 1}}})
        scored, _ = load_tasks(remote)
        assert (scored["b"].corpus is not None) == held and scored["b"].text_ids == load_beir(SAMPLE).text_ids


def test_config_rules():
    with pytest.raises(ConfigError, match="retrieval.mode=hybrid needs retrieval.backend=qdrant"):
        EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "passkey"}], "retrieval": {"mode": "hybrid"}})
    with pytest.raises(ConfigError, match="a beir task needs path"):
        EvalConfig.from_dict({"tasks": [{"name": "b", "kind": "beir"}]})
    with pytest.raises(ConfigError, match=r"task names must be unique; repeated: \['p'\]"):
        EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "passkey"}, {"name": "p", "kind": "needle"}]})
    cfg = EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "passkey"}]}, ["retrieval.top_k=50"])
    assert cfg.tasks[0].lengths == [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert (cfg.retrieval.backend, cfg.retrieval.mode, cfg.retrieval.top_k) == ("exact", "dense", 50)
    assert cfg.embedder.documents.windows == "first"
    with pytest.raises(ConfigError, match="moved to the embedder's document policy"):
        EvalConfig.from_dict({"tasks": [{"name": "p", "kind": "passkey"}]}, ["retrieval.encode.long_documents=chunk"])
    for shipped in ("eval_cpu.yaml", "eval_longembed_dream.yaml"):  # the shipped configs validate
        cfg = EvalConfig.from_yaml(ROOT / "jobs" / "configs" / shipped)
        assert {t.kind for t in cfg.tasks} >= {"passkey", "needle"}
    assert cfg.embedder.dtype == "bf16" and max(cfg.tasks[0].lengths) == 32768


# ------------------------------------------------------------------------------------------- the job


def test_minilm_end_to_end_exact(tmp_path):
    cfg = config(tmp_path)
    results = run_evaluation(cfg, progress=False)
    tasks = results["tasks"]
    assert list(tasks) == ["sample", "passkey@64", "passkey@256", "passkey", "needle@128", "needle"]
    assert tasks["sample"]["ndcg@10"] > 0.8 and tasks["sample"]["queries"] == 18
    assert tasks["sample"]["documents"] == 37
    # well above chance on the short synthetic tasks (10 documents: nDCG@1 0.1, MRR@10 0.29 at random)
    assert tasks["passkey"]["ndcg@1"] >= 0.5 and tasks["needle"]["mrr@10"] >= 0.5
    for entry in tasks.values():
        assert all(0.0 <= entry[m] <= 1.0 for m in METRICS)
    for m in METRICS:  # a synthetic task's own entry is the mean over its lengths
        assert tasks["passkey"][m] == pytest.approx((tasks["passkey@64"][m] + tasks["passkey@256"][m]) / 2)
    assert (tasks["passkey"]["queries"], tasks["passkey"]["documents"]) == (10, 20)
    assert results["primary"]["sample"] == ("ndcg@10", tasks["sample"]["ndcg@10"])
    assert results["primary"]["passkey@64"] == ("ndcg@1", tasks["passkey@64"]["ndcg@1"])
    assert results["primary"]["needle"][0] == "ndcg@1"
    assert results["model"] == "all-MiniLM-L6-v2" and results["name"] == "t"

    out = Path(cfg.output_dir)
    assert load_results(out) == results
    md = (out / "results.md").read_text()
    assert "| passkey@256 |" in md and f"**{100 * tasks['sample']['ndcg@10']:.2f}**" in md
    table = comparison_table([results, {**results, "name": "other"}])
    assert "| sample | ndcg@10 |" in table and "| t | other |" in table


def test_chunking_reaches_the_far_end_of_long_documents():
    """64-token windows on 512-token documents: truncation only sees pass keys near the start, chunks see all."""
    best = Embedder(EmbedderConfig(max_length=64, documents={"windows": "best", "overlap": 8}))
    first = Embedder(EmbedderConfig(max_length=64, documents={"windows": "first"}), backbone=best.backbone)
    data = passkey_task(best.tokenizer, 512, n_queries=8, n_documents=16, seed=0)
    chunked = evaluate(data.qrels, exact_run(best, data, 100))
    truncated = evaluate(data.qrels, exact_run(first, data, 100))
    assert chunked["ndcg@1"] >= truncated["ndcg@1"] + 0.3
    assert chunked["mrr@10"] > truncated["mrr@10"]


def test_exact_backend_equals_qdrant_backend(ray_cluster, tmp_path):
    overrides = ["embedder.max_length=64", "embedder.documents={windows: best, overlap: 8}", "retrieval.top_k=10",
                 "retrieval.store.sparse=true", f"retrieval.store.path={tmp_path / 'qdrant'}"]
    tasks = {"tasks": [
        {"name": "sample", "kind": "beir", "path": str(SAMPLE)},
        {"name": "passkey", "kind": "passkey", "lengths": [160], "queries_per_length": 5, "documents_per_length": 8},
    ]}
    qdrant_cfg = config(tmp_path, *overrides, "retrieval.backend=qdrant", **tasks)
    exact_cfg = config(tmp_path, *overrides, f"output_dir={tmp_path / 'exact'}", **tasks)
    via_qdrant = run_evaluation(qdrant_cfg, progress=False)
    exact = run_evaluation(exact_cfg, progress=False)
    assert set(via_qdrant["indexing"]) == {"sample", "passkey@160"}
    # the BEIR corpus went to the batch job as its own file; only the generated task's documents were written
    assert sorted(p.name for p in (tmp_path / "out" / "corpora").iterdir()) == [
        f"{collection_name(qdrant_cfg, 'passkey@160')}.jsonl"]
    assert via_qdrant["indexing"]["passkey@160"]["chunks_written"] > 8  # several windows per document
    for name, entry in exact["tasks"].items():
        for m in METRICS:
            assert via_qdrant["tasks"][name][m] == pytest.approx(entry[m], abs=1e-6), (name, m)

    # the runs themselves: same documents, same scores (each document's best chunk)
    embedder = Embedder(qdrant_cfg.embedder)
    data = passkey_task(embedder.tokenizer, 160, 5, 8, seed=0, name="passkey@160")
    by_store = search_run(qdrant_cfg, embedder, data, store_config(qdrant_cfg, data.name))
    by_exact = exact_run(embedder, data, 10)
    assert by_store.keys() == by_exact.keys()
    for qid in by_exact:
        assert by_store[qid].keys() == by_exact[qid].keys()
        for doc_id, score in by_exact[qid].items():
            assert by_store[qid][doc_id] == pytest.approx(score, abs=1e-5)

    # hybrid (dense + BM25, RRF) and sparse on the same collections, searched as they are
    for mode in ("hybrid", "sparse"):
        other = config(tmp_path, *overrides, "retrieval.backend=qdrant", f"retrieval.mode={mode}",
                       "retrieval.reuse_collections=true", f"output_dir={tmp_path / mode}", **tasks)
        results = run_evaluation(other, progress=False)
        assert all(info.get("reused") for info in results["indexing"].values())
        assert results["tasks"]["sample"]["ndcg@10"] > 0.7, mode
        assert results["retrieval"]["mode"] == mode


def test_tiny_dream_checkpoint_runs(tmp_path, model_path):
    cfg = config(
        tmp_path, f"embedder.model={model_path('dream')}",
        tasks=[{"name": "sample", "kind": "beir", "path": str(SAMPLE)},
               {"name": "pk", "kind": "passkey", "lengths": [128], "queries_per_length": 3,
                "documents_per_length": 6}],
    )
    results = run_evaluation(cfg, progress=False)
    assert list(results["tasks"]) == ["sample", "pk@128", "pk"]
    assert results["embedder"]["family"] == "dream" and results["embedder"]["attention"] == "bidirectional"
    for entry in results["tasks"].values():
        assert all(0.0 <= entry[m] <= 1.0 for m in METRICS)
    assert (Path(cfg.output_dir) / "results.json").is_file()


# ------------------------------------------------------------------------------------------- the CLI


def write_config(tmp_path: Path, dataset: Path, *extra: str) -> Path:
    path = tmp_path / "eval.yaml"
    path.write_text(
        "embedder: {model: all-MiniLM-L6-v2}\n"
        f"tasks:\n  - {{name: b, kind: beir, path: {dataset}}}\n"
        f"output_dir: {tmp_path / 'out'}\n" + "".join(f"{line}\n" for line in extra)
    )
    return path


def test_cli_unknown_qrels_id_exits_2_with_one_line(tmp_path):
    root = copy_sample(tmp_path)
    (root / "qrels" / "test.tsv").open("a").write("q01\td404\t1\n")
    proc = subprocess.run([sys.executable, str(EVALUATE), "--config", str(write_config(tmp_path, root))],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "test.tsv:" in lines[0] and "corpus id 'd404' is not in corpus.jsonl" in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "damage, args, message",
    [
        (lambda d: (d / "queries.jsonl").write_text(""), [], "queries.jsonl: no queries"),
        (lambda d: None, ["tasks.0.split=train"], "no split 'train'"),
        (lambda d: None, ["retrieval.mode=sparse"], "retrieval.mode=sparse needs retrieval.backend=qdrant"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, damage, args, message):
    sys.path.insert(0, str(EVALUATE.parent))
    try:
        import evaluate as job
    finally:
        sys.path.remove(str(EVALUATE.parent))
    root = copy_sample(tmp_path)
    damage(root)
    path = write_config(tmp_path, root)
    if args and args[0].startswith("tasks.0"):  # lists are not addressable by overrides: edit the YAML
        path.write_text(path.read_text().replace("kind: beir,", "kind: beir, split: train,"))
        args = []
    assert job.main(["--config", str(path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# ------------------------------------------------------------------------------------------- fusion


def test_fusion_config_rules():
    base = {"tasks": [{"name": "p", "kind": "passkey"}]}
    for retrieval, message in [
        ({"backend": "qdrant", "mode": "dense", "fusion": "dbsf"}, "apply to retrieval.mode=hybrid only"),
        ({"backend": "qdrant", "mode": "hybrid", "tune_fusion": True, "fusion": "rrf"}, "leave them unset"),
        ({"backend": "qdrant", "mode": "hybrid", "fusion": "rrf", "dense_weight": 0.3}, "fusion weighted only"),
        ({"backend": "qdrant", "mode": "hybrid", "fusion": "max"}, "fusion"),
        ({"backend": "qdrant", "mode": "hybrid", "fusion_weights": [1.5]}, "fusion_weights"),
    ]:
        with pytest.raises(ConfigError, match=message):
            EvalConfig.from_dict({**base, "retrieval": retrieval})
    ok = EvalConfig.from_dict({**base, "retrieval": {"backend": "qdrant", "mode": "hybrid", "fusion": "weighted",
                                                      "dense_weight": 0.7}})
    assert ok.retrieval.dense_weight == 0.7


def test_the_tuning_split_shares_the_scored_splits_corpus():
    """--tune-fusion reads the corpus once: the dev split's data holds the test split's documents, not a copy."""
    from diffembed.eval.runner import load_tasks

    cfg = EvalConfig.from_dict({"tasks": [{"name": "b", "kind": "beir", "path": str(SAMPLE)}],
                                "retrieval": {"backend": "qdrant", "mode": "hybrid", "tune_fusion": True}})
    scored, tuning = load_tasks(cfg)
    assert tuning["b"].text_ids is scored["b"].text_ids and tuning["b"].titles is scored["b"].titles
    assert tuning["b"].meta["split"] == "dev" and tuning["b"].qrels != scored["b"].qrels
    alone = load_beir(SAMPLE, "dev", texts=False)
    assert (alone.text_ids, alone.size, alone.queries, alone.qrels) == (
        tuning["b"].text_ids, tuning["b"].size, tuning["b"].queries, tuning["b"].qrels)


def test_cli_tune_fusion_end_to_end(ray_cluster, tmp_path, capsys):
    """--tune-fusion on the sample (4 judged dev queries): the dev grid is reported, the best setting is stored with the
    collection, the test split is scored with it, and a later hybrid search there uses it by default."""
    from diffembed.index.config import StoreConfig
    from diffembed.index.edge import EdgeStore
    from diffembed.index.fusion import FusionSettings

    sys.path.insert(0, str(EVALUATE.parent))
    try:
        import evaluate as job
    finally:
        sys.path.remove(str(EVALUATE.parent))
    path = write_config(tmp_path, copy_sample(tmp_path), "retrieval: {top_k: 10, fusion_weights: [0.0, 0.5, 1.0]}")
    assert job.main(["--config", str(path), "--tune-fusion"]) == 0
    out = capsys.readouterr().out
    assert "Fusion tuned on `b` split dev" in out and "| weighted (dense_weight 0.5) |" in out

    results = load_results(tmp_path / "out")
    tuned = results["fusion_tuning"]["b"]
    assert [(r["fusion"], r["dense_weight"]) for r in tuned["grid"]] == [
        ("rrf", None), ("dbsf", None), ("weighted", 0.0), ("weighted", 0.5), ("weighted", 1.0)]
    assert tuned["queries"] == 4 and all(0.0 <= r["ndcg@10"] <= 1.0 for r in tuned["grid"])
    best = max(r["ndcg@10"] for r in tuned["grid"])
    assert tuned["chosen"]["ndcg_at_10"] == pytest.approx(best, abs=1e-6) and tuned["chosen"]["tuned_on"] == "b/dev"
    assert results["retrieval"]["mode"] == "hybrid" and results["retrieval"]["fusion"]["b"]["fusion"] == tuned[
        "chosen"]["fusion"]
    assert "Fusion tuned on" in (tmp_path / "out" / "results.md").read_text()

    chosen = FusionSettings.model_validate(tuned["chosen"])
    with EdgeStore(StoreConfig(path=str(tmp_path / "out" / "qdrant"), collection="eval-eval-b", sparse=True)) as store:
        assert store.search_settings() == chosen
        emb = Embedder(EmbedderConfig())
        text = "how are passages retrieved?"
        vector = emb.encode_queries([text])[0]
        default = store.search(vector, text, top_k=10, mode="hybrid")  # as the Serve retriever calls it
        explicit = store.search(vector, text, top_k=10, mode="hybrid", fusion=chosen.fusion,
                                dense_weight=chosen.dense_weight if chosen.fusion == "weighted" else None)
        assert [(h.id, h.score) for h in default] == [(h.id, h.score) for h in explicit]


def test_quality_at_each_served_dimension(tmp_path):
    """retrieval.dimensions scores the Matryoshka prefixes as Serve's `dimensions` serves them."""
    cfg = EvalConfig.from_dict({
        "name": "dims", "output_dir": str(tmp_path / "out"), "embedder": {"model": "all-MiniLM-L6-v2"},
        "tasks": [{"name": "sample", "kind": "beir", "path": str(SAMPLE)}],
        "retrieval": {"dimensions": [16, 128, 384]},
    })
    sample = run_evaluation(cfg, progress=False)["tasks"]["sample"]
    dims = sample["by_dimension"]
    assert list(dims) == ["16", "128", "384"]
    assert dims["384"]["ndcg@10"] == pytest.approx(sample["ndcg@10"])  # the full size is the main figure
    assert dims["16"]["ndcg@10"] < dims["128"]["ndcg@10"]  # an untrained 16-d prefix loses quality
    with pytest.raises(ValueError, match="backend=exact"):
        EvalConfig.from_dict({"name": "x", "tasks": cfg.model_dump()["tasks"],
                              "retrieval": {"backend": "qdrant", "dimensions": [16]}})
