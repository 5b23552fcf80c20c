"""The GPU tier (`-m gpu`; skipped where no CUDA device is present, so CI never runs it).

Run on a GPU machine: `python -m pytest -q -m gpu tests/test_gpu.py`. What it pins down: every family gives the same
vectors on CUDA (fp32 and bf16) as on CPU in fp32; every attention backend gives the same vectors; the encode
pipeline is batched == single on the device; an out-of-memory batch is split instead of failing; the 7B-wide
checkpoint loads and encodes a full token budget within the card's memory.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from diffembed import Embedder, EmbedderConfig
from diffembed.testing.tiny import TINY_FAMILIES, write_tiny_checkpoint

pytestmark = pytest.mark.gpu

TEXTS = [
    "Diffusion language models read the whole sequence at once.",
    "short",
    " ".join(["a longer document about bidirectional attention and mean pooling"] * 40),
    "Retrieval needs embeddings that keep meaning apart.",
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_matches_cpu_fp32(model_path, family, dtype):
    reference = Embedder(EmbedderConfig(model=model_path(family), device="cpu")).encode_documents(TEXTS)
    cuda = Embedder(EmbedderConfig(model=model_path(family), device="cuda", dtype=dtype)).encode_documents(TEXTS)
    assert cosine(cuda, reference).min() > (0.99999 if dtype == "fp32" else 0.999)


BACKENDS = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("family", ["dream", "llama"])
def test_attention_backends_give_the_same_vectors(model_path, family):
    vectors = {
        backend: Embedder(EmbedderConfig(model=model_path(family), device="cuda", dtype="bf16",
                                         attn_implementation=backend)).encode_documents(TEXTS)
        for backend in BACKENDS
    }
    for backend, v in vectors.items():
        assert cosine(v, vectors["sdpa"]).min() > 0.999, backend


def test_pipeline_batched_equals_single_on_cuda(model_path, monkeypatch):
    import diffembed.models.embedder as embedder_module

    monkeypatch.setattr(embedder_module, "FIRST_SLICE", 3)  # several tokenisation slices, batches across them
    emb = Embedder(EmbedderConfig(model=model_path("dream"), device="cuda", max_batch_tokens=256))
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"], int(n))) for n in
             rng.integers(1, 120, 40)]
    together = emb.encode_documents(texts)
    alone = np.stack([emb.encode_documents([t])[0] for t in texts])
    assert np.abs(together - alone).max() < 1e-5


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """The real Dream-7B width (hidden 3584, 28 heads, 4 KV heads, MLP 18944), two layers, bf16."""
    return write_tiny_checkpoint("dream", tmp_path_factory.mktemp("wide"), layers=2, hidden_size=3584, heads=28,
                                 kv_heads=4, intermediate_size=18944, max_positions=8192, dtype="bfloat16")


def test_7b_wide_load_and_full_token_budget(wide_checkpoint):
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    emb = Embedder(EmbedderConfig(model=str(wide_checkpoint), device="cuda", dtype="bf16", max_length=4096))
    load_s = time.perf_counter() - started
    budget = emb.config.max_batch_tokens
    texts = [" ".join(["token"] * 4000)] * (budget // 4096)  # one full batch at the shipped budget
    vectors = emb.encode_documents(texts)
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"7B-wide 2-layer load {load_s:.1f} s; {budget} tokens/batch peak {peak / 2**30:.1f} GiB "
          f"of {total / 2**30:.0f} GiB")
    assert np.isfinite(vectors).all() and peak < 0.5 * total


def test_out_of_memory_batch_is_split_not_failed(wide_checkpoint):
    emb = Embedder(EmbedderConfig(model=str(wide_checkpoint), device="cuda", dtype="bf16", max_length=4096,
                                  max_batch_tokens=64 * 2048))
    texts = [" ".join(["word"] * (1500 + 7 * i)) for i in range(64)]
    expected = np.concatenate([emb.encode_documents(texts[i : i + 4]) for i in range(0, 64, 4)])
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory

    def limit(extra: int) -> None:  # the weights plus `extra` bytes
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + extra) / total)

    try:
        limit(6 * 2**30)  # a 64 x ~2000-token batch needs ~15 GiB of activations; a few rows fit in 6
        vectors = emb.encode_documents(texts)
        limit(64 * 2**20)  # not even one 4000-token window fits (its MLP activation alone is ~150 MB)
        with pytest.raises(ValueError, match=r"input 0: one window of \d+ tokens does not fit"):
            emb.encode_documents([" ".join(["word"] * 4000)])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert cosine(vectors, expected).min() > 0.9999


def test_one_lora_step_and_export_on_cuda(model_path, tmp_path):
    """A LoRA training step on the GPU through the training core (no Ray: the worker's own pieces), its checkpoint,
    and the export: the exported model embeds as the trained one does."""
    from diffembed.train.backends import TorchBackend
    from diffembed.train.config import TrainConfig
    from diffembed.train.export import write_export
    from diffembed.train.losses import info_nce
    from diffembed.train.worker import build_trainable, train_step

    cfg = TrainConfig.from_dict({
        "embedder": {"model": model_path("dream"), "device": "cuda"},
        "data": {"train_files": ["unused.jsonl"]},
        "run": {"use_gpu": True, "num_workers": 1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "optim": {"lr": 1e-2, "max_steps": 1, "warmup_steps": 0},
        "deepspeed": {"enabled": False},
    })
    emb = Embedder(cfg.embedder)
    before = emb.encode_documents(TEXTS)
    engine = TorchBackend(cfg, build_trainable(emb, cfg), emb.device, world=1)
    emb.model = engine.model
    queries = emb.query_segments(["what reads both ways", "tiny query"])
    docs = emb.document_segments(TEXTS[:2], windows="first")
    loss = train_step(emb, engine, queries, docs, [], lambda q, p, n: info_nce(q, p, n), chunk=None)
    assert torch.isfinite(loss)
    engine.eval()
    trained = emb.encode_documents(TEXTS)
    assert cosine(trained, before).min() < 0.99999  # the step changed the model
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    engine.save(str(ckpt), {"step": 1}, rank=0)
    out = tmp_path / "export"
    out.mkdir()
    write_export(cfg, str(ckpt), out, [])
    exported = Embedder(EmbedderConfig(model=str(out), device="cuda")).encode_documents(TEXTS)
    assert cosine(exported, trained).min() > 0.9999
