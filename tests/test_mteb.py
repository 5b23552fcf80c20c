"""The MTEB adapter: a local retrieval task (no downloads) run through mteb 2.x with the packaged MiniLM.

The task's data is written as BEIR-style files into a temporary folder and read back by the task's
`load_data`, the way a user would plug in a dataset they already have.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before mteb is imported: its default result cache is created at import time.
os.environ.setdefault("MTEB_CACHE", str(Path(tempfile.gettempdir()) / "diffembed-test-mteb-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import socket

import numpy as np
import pytest

import mteb
from datasets import Dataset
from mteb._create_dataloaders import create_dataloader
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models import EncoderProtocol
from mteb.types import PromptType

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.eval.metrics import dense_run, evaluate
from diffembed.eval.mteb_adapter import MTEBEncoder, result_path, run_mteb, summarize

TASK_NAME = "DiffembedToyRetrieval"
INSTRUCTION = "Given a question, retrieve the passage that answers it"

CORPUS = {
    "d0": ("Paris", "Paris is the capital and largest city of France."),
    "d1": ("Photosynthesis", "Plants use sunlight, water and carbon dioxide to make glucose and oxygen."),
    "d2": ("", "The Pacific Ocean is the largest and deepest ocean on Earth."),
    "d3": ("Mount Everest", "Mount Everest is the highest mountain above sea level, in the Himalayas."),
    "d4": ("", "Honey bees make honey from the nectar of flowers."),
    "d5": ("Python", "Python is a programming language known for its readable syntax."),
    "d6": ("", "The Great Wall of China was built over many centuries to protect against invasions."),
    "d7": ("Coffee", "Coffee is brewed from the roasted seeds of the coffee plant."),
    "d8": ("", "Football is played by two teams of eleven players who kick a ball into a goal."),
    "d9": ("Moon", "The Moon orbits the Earth roughly once every 27 days."),
}
QUERIES = {
    "q0": "What is the capital of France?",
    "q1": "How do plants make their food from sunlight?",
    "q2": "Which is the tallest mountain in the world?",
    "q3": "What is the biggest ocean on the planet?",
    "q4": "How long does the Moon take to go around the Earth?",
}
QRELS = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d2": 1}, "q4": {"d9": 1}}


def write_beir_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in CORPUS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(root / "qrels.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in QRELS.items():
            for doc_id, grade in docs.items():
                f.write(f"{qid}\t{doc_id}\t{grade}\n")
    return root


class LocalRetrievalTask(AbsTaskRetrieval):
    """An mteb retrieval task over a BEIR-style folder on disk (`data_dir`): nothing is downloaded."""

    metadata = TaskMetadata(
        name=TASK_NAME,
        description="Ten encyclopaedic sentences and five questions with one obvious answer each.",
        reference=None,
        dataset={"path": "local/diffembed-toy", "revision": "1"},
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=("2024-01-01", "2024-01-01"),
        domains=["Encyclopaedic"],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        dialect=[],
        sample_creation="created",
        bibtex_citation="",
    )
    data_dir: Path

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        if self.data_loaded:
            return
        read = lambda name: [json.loads(line) for line in (self.data_dir / name).read_text().splitlines()]  # noqa: E731
        corpus = Dataset.from_list(
            [{"id": r["_id"], "title": r["title"], "text": r["text"]} for r in read("corpus.jsonl")]
        )
        queries = Dataset.from_list([{"id": r["_id"], "text": r["text"]} for r in read("queries.jsonl")])
        qrels: dict[str, dict[str, int]] = {}
        for line in (self.data_dir / "qrels.tsv").read_text().splitlines()[1:]:
            qid, doc_id, grade = line.split("\t")
            qrels.setdefault(qid, {})[doc_id] = int(grade)
        self.dataset = {"default": {"test": RetrievalSplitData(corpus=corpus, queries=queries, relevant_docs=qrels,
                                                               top_ranked=None)}}
        self.data_loaded = True


def make_task(data_dir: Path) -> LocalRetrievalTask:
    task = LocalRetrievalTask()
    task.data_dir = data_dir
    return task


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet socket is recorded and refused (mteb must not fetch metadata)."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", lambda s, a: refuse(s, a) or real_connect(s, a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda s, a: refuse(s, a) or real_connect_ex(s, a))
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_beir_folder(tmp_path_factory.mktemp("toy-beir"))


def dataloader(texts=None, *, prompt_type, batch_size=32, task=None, dataset=None):
    """The DataLoader mteb itself builds for a task's queries or corpus."""
    if dataset is None:
        if prompt_type == PromptType.query:
            dataset = Dataset.from_list([{"id": str(i), "text": t} for i, t in enumerate(texts)])
        else:
            dataset = Dataset.from_list([{"id": str(i), "title": ti, "text": t} for i, (ti, t) in enumerate(texts)])
    return create_dataloader(dataset, task_metadata=(task or LocalRetrievalTask).metadata, prompt_type=prompt_type,
                             batch_size=batch_size)


def encode(encoder, loader, prompt_type, task=LocalRetrievalTask):
    return encoder.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                          prompt_type=prompt_type, batch_size=loader.batch_size)


# ---------------------------------------------------------------------------------------------- end to end


def test_mteb_score_matches_our_metrics_and_is_saved(minilm, data_dir, tmp_path, no_network):
    out = tmp_path / "mteb-results"
    result = run_mteb(EmbedderConfig(), [make_task(data_dir)], out, instructions={TASK_NAME: INSTRUCTION})

    # mteb's own result object
    assert isinstance(result, mteb.results.ModelResult)
    assert result.model_name == "diffembed/all-MiniLM-L6-v2"
    [task_result] = result.task_results
    assert task_result.task_name == TASK_NAME
    [scores] = task_result.scores["test"]
    mteb_ndcg = scores["ndcg_at_10"]
    assert scores["main_score"] == mteb_ndcg
    assert summarize(result) == {TASK_NAME: pytest.approx(mteb_ndcg)}
    assert mteb_ndcg > 0.8

    # the same numbers from our Embedder and our pytrec_eval metrics, on the same data
    doc_ids = list(CORPUS)
    docs = minilm.encode_documents([f"{ti} {t}".strip() for ti, t in CORPUS.values()])
    queries = minilm.encode_queries(list(QUERIES.values()), instruction=INSTRUCTION)
    ours = evaluate(QRELS, dense_run(queries, docs, list(QUERIES), doc_ids))
    assert mteb_ndcg == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert scores["recall_at_10"] == pytest.approx(ours["recall@10"], abs=1e-4)
    assert scores["ndcg_at_1"] == pytest.approx(ours["ndcg@1"], abs=1e-4)

    # mteb's saved JSON (result + model metadata) in the output folder, under name/revision
    encoder = MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION})
    path = result_path(encoder, out, TASK_NAME)
    assert path.is_file(), sorted(str(p) for p in out.rglob("*"))
    saved = json.loads(path.read_text())
    assert saved["task_name"] == TASK_NAME
    assert saved["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(mteb_ndcg, abs=1e-4)
    meta = json.loads((path.parent / "model_meta.json").read_text())
    assert meta["name"] == "diffembed/all-MiniLM-L6-v2"
    assert meta["embed_dim"] == 384
    assert meta["similarity_fn_name"] == "cosine"
    assert meta["max_tokens"] == minilm.config.max_length
    assert meta["loader_kwargs"]["config"]["pooling"] == "mean"
    assert meta["loader_kwargs"]["instructions"] == {TASK_NAME: INSTRUCTION}


def test_second_run_reads_the_cache_and_a_new_setting_gets_a_new_folder(minilm, data_dir, tmp_path, no_network):
    encoder = MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION})
    first = run_mteb(encoder, [make_task(data_dir)], tmp_path)
    path = result_path(encoder, tmp_path, TASK_NAME)
    stamp = path.stat().st_mtime_ns

    calls = []
    real = minilm.encode_queries
    try:
        minilm.encode_queries = lambda *a, **k: calls.append(1) or real(*a, **k)  # spy only, still the real encoder
        again = run_mteb(encoder, [make_task(data_dir)], tmp_path)
    finally:
        del minilm.encode_queries
    assert calls == [] and path.stat().st_mtime_ns == stamp
    assert summarize(again) == summarize(first)

    other = MTEBEncoder(minilm, instructions={TASK_NAME: ""})  # different instructions: different revision
    assert other.mteb_model_meta.revision != encoder.mteb_model_meta.revision
    assert MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION}).mteb_model_meta.revision == \
        encoder.mteb_model_meta.revision
    run_mteb(other, [make_task(data_dir)], tmp_path)
    assert result_path(other, tmp_path, TASK_NAME).is_file()


def test_model_meta_rebuilds_the_same_encoder(minilm):
    encoder = MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION})
    assert isinstance(encoder, EncoderProtocol)
    rebuilt = encoder.mteb_model_meta.load_model()
    assert isinstance(rebuilt, MTEBEncoder)
    assert rebuilt.mteb_model_meta.revision == encoder.mteb_model_meta.revision
    texts = list(QUERIES.values())
    np.testing.assert_allclose(
        encode(rebuilt, dataloader(texts, prompt_type=PromptType.query), PromptType.query),
        encode(encoder, dataloader(texts, prompt_type=PromptType.query), PromptType.query),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------------- encode paths


def test_queries_get_the_instruction_and_documents_do_not(minilm):
    texts = list(QUERIES.values())
    with_ins = MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION})
    without = MTEBEncoder(minilm)  # config.query_instruction is None: queries as they are

    q_with = encode(with_ins, dataloader(texts, prompt_type=PromptType.query), PromptType.query)
    q_without = encode(without, dataloader(texts, prompt_type=PromptType.query), PromptType.query)
    assert q_with.shape == (5, 384) and q_with.dtype == np.float32
    np.testing.assert_allclose(q_with, minilm.encode_queries(texts, instruction=INSTRUCTION), atol=1e-6)
    np.testing.assert_allclose(q_without, minilm.encode_queries(texts), atol=1e-6)
    assert np.abs(q_with - q_without).max() > 1e-2  # the instruction changes the query vectors

    # documents: title + " " + text as mteb joins them, no instruction, whatever the instruction map says
    pairs = list(CORPUS.values())
    d_with = encode(with_ins, dataloader(pairs, prompt_type=PromptType.document), PromptType.document)
    d_without = encode(without, dataloader(pairs, prompt_type=PromptType.document), PromptType.document)
    expected = minilm.encode_documents([f"{ti} {t}".strip() for ti, t in pairs])
    np.testing.assert_allclose(d_with, expected, atol=1e-6)
    np.testing.assert_allclose(d_without, expected, atol=1e-6)
    # mteb's body and title reach the Embedder apart: the document policy joins them (here: title ignored)
    no_titles = MTEBEncoder(Embedder(EmbedderConfig(documents={"title": "ignore"}), backbone=minilm.backbone))
    d_body = encode(no_titles, dataloader(pairs, prompt_type=PromptType.document), PromptType.document)
    np.testing.assert_allclose(d_body, minilm.encode_documents([t for _, t in pairs]), atol=1e-6)
    with pytest.raises(ConfigError, match="one vector per document"):  # best-window scoring cannot go through mteb
        MTEBEncoder(Embedder(EmbedderConfig(documents={"windows": "best"}), backbone=minilm.backbone))
    # a query vector is not a document vector of the same text
    q_as_doc = encode(with_ins, dataloader([("", t) for t in texts], prompt_type=PromptType.document),
                      PromptType.document)
    assert np.abs(q_as_doc - q_with).max() > 1e-2


def test_instruction_map_by_task_type_task_prompt_and_config_default(minilm):
    texts = list(QUERIES.values())[:2]
    loader = lambda: dataloader(texts, prompt_type=PromptType.query)  # noqa: E731

    by_type = encode(MTEBEncoder(minilm, instructions={"Retrieval": "Find the answer"}), loader(), PromptType.query)
    np.testing.assert_allclose(by_type, minilm.encode_queries(texts, instruction="Find the answer"), atol=1e-6)

    # the task's own prompt (as BRIGHT ships) is used only when asked for
    class PromptedTask(LocalRetrievalTask):
        metadata = LocalRetrievalTask.metadata.model_copy(update={"prompt": {"query": "Retrieve the fact"}})

    prompted = encode(MTEBEncoder(minilm, use_task_prompts=True), loader(), PromptType.query, task=PromptedTask)
    np.testing.assert_allclose(prompted, minilm.encode_queries(texts, instruction="Retrieve the fact"), atol=1e-6)
    plain = encode(MTEBEncoder(minilm), loader(), PromptType.query, task=PromptedTask)
    np.testing.assert_allclose(plain, minilm.encode_queries(texts, instruction=""), atol=1e-6)

    # the Embedder's configured default instruction applies when nothing else does
    minilm.config.query_instruction = "Configured default"
    try:
        configured = encode(MTEBEncoder(minilm), loader(), PromptType.query)
        np.testing.assert_allclose(configured, minilm.encode_queries(texts, instruction="Configured default"),
                                   atol=1e-6)
        none_for_task = encode(MTEBEncoder(minilm, instructions={TASK_NAME: None}), loader(), PromptType.query)
        np.testing.assert_allclose(none_for_task, minilm.encode_queries(texts, instruction=""), atol=1e-6)
    finally:
        minilm.config.query_instruction = None


def test_per_query_instructions_from_the_batch_win(minilm):
    """FollowIR-style tasks give each query its own instruction; mteb passes it in the batch."""
    texts = list(QUERIES.values())[:3]
    own = ["Only passages about European cities are relevant", "", "Mountains in Asia only"]
    dataset = Dataset.from_list(
        [{"id": str(i), "text": t, "instruction": ins} for i, (t, ins) in enumerate(zip(texts, own))]
    )

    class InstructionTask(LocalRetrievalTask):
        metadata = LocalRetrievalTask.metadata.model_copy(update={"type": "InstructionRetrieval"})

    loader = dataloader(prompt_type=PromptType.query, dataset=dataset, batch_size=2, task=InstructionTask)
    first = next(iter(loader))
    assert first["text"][0] != first["query"][0]  # mteb appends the instruction to `text`; we read `query`

    encoder = MTEBEncoder(minilm, instructions={"InstructionRetrieval": INSTRUCTION})
    got = encode(encoder, loader, PromptType.query, task=InstructionTask)
    expected = minilm.encode_queries(texts, instruction=[own[0], INSTRUCTION, own[2]])  # empty: the task's one
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_batched_encode_equals_one_at_a_time(minilm):
    encoder = MTEBEncoder(minilm, instructions={TASK_NAME: INSTRUCTION})
    pairs = list(CORPUS.values())
    docs = lambda size: dataloader(pairs, prompt_type=PromptType.document, batch_size=size)  # noqa: E731
    docs_batched = encode(encoder, docs(4), PromptType.document)
    docs_single = encode(encoder, docs(1), PromptType.document)
    one_by_one = np.concatenate([minilm.encode_documents([f"{ti} {t}".strip()]) for ti, t in pairs])
    np.testing.assert_allclose(docs_batched, docs_single, atol=1e-5)
    np.testing.assert_allclose(docs_batched, one_by_one, atol=1e-5)

    texts = list(QUERIES.values())
    q_batched = encode(encoder, dataloader(texts, prompt_type=PromptType.query, batch_size=3), PromptType.query)
    q_single = np.concatenate([minilm.encode_queries([t], instruction=INSTRUCTION) for t in texts])
    np.testing.assert_allclose(q_batched, q_single, atol=1e-5)


def test_empty_documents_get_zero_vectors_and_symmetric_tasks_use_documents(minilm):
    encoder = MTEBEncoder(minilm)
    pairs = [("", "A real sentence about cats."), ("", "   "), ("Dogs", "Dogs bark.")]
    got = encode(encoder, dataloader(pairs, prompt_type=PromptType.document), PromptType.document)
    assert np.all(got[1] == 0)
    np.testing.assert_allclose(got[[0, 2]], minilm.encode_documents(["A real sentence about cats.", "Dogs Dogs bark."]),
                               atol=1e-6)
    # similarity is cosine: the empty document scores 0, the others their inner product
    sims = np.asarray(encoder.similarity(got[:1], got))
    assert sims[0, 1] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-5)

    # prompt_type None (STS, clustering, ...): plain texts, encoded as documents
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    sym = encoder.encode(dataloader(dataset=Dataset.from_dict({"text": texts}), prompt_type=None),
                         task_metadata=LocalRetrievalTask.metadata, hf_split="test", hf_subset="default")
    np.testing.assert_allclose(sym, minilm.encode_documents(texts), atol=1e-6)


def test_importing_the_adapter_does_not_import_mteb():
    import subprocess
    import sys

    code = "import sys, diffembed, diffembed.eval.mteb_adapter; print('mteb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
