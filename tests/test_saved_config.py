"""diffembed.json holds the embedding function only; the loading machine's runtime settings always apply."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np

from diffembed import Embedder, EmbedderConfig
from diffembed.config import EMBEDDING_FUNCTION_FIELDS, RUNTIME_FIELDS
from diffembed.models.embedder import DEFAULT_BATCH_TOKENS
from diffembed.train.export import write_embedder_config


def copy_model(src, dest):
    shutil.copytree(src, dest)
    (dest / "diffembed.json").unlink(missing_ok=True)
    return dest


def test_export_writes_the_embedding_function_only(model_path, tmp_path):
    # an export made on a "GPU machine" setting: bf16, a large batch budget, eager attention
    cfg = EmbedderConfig(model=model_path("qwen2"), attention="bidirectional", dtype="bf16", max_batch_tokens=32768, max_batch_size=8,
                         attn_implementation="eager", query_instruction="Find passages",
                         exclude_instruction_from_pooling=True, max_length=128,
                         documents={"windows": "mean", "overlap": 16, "prefix": "passage: "})
    exporting = Embedder(cfg)
    out = copy_model(exporting.backbone.path, tmp_path / "export")
    write_embedder_config(out, exporting.config, "qwen2")
    saved = json.loads((out / "diffembed.json").read_text())
    assert set(saved) == set(EMBEDDING_FUNCTION_FIELDS) - {"mask_tokens", "mask_vectors"}  # pooling is not mask
    assert not set(saved) & set(RUNTIME_FIELDS)
    assert saved["documents"] == {"title": "prepend", "title_separator": " ", "prefix": "passage: ",
                                  "windows": "mean", "overlap": 16}

    loaded = Embedder(EmbedderConfig(model=str(out)))  # this machine's defaults: CPU, fp32
    assert loaded.config.dtype == "fp32" and loaded.model.dtype.is_floating_point
    assert next(loaded.model.parameters()).dtype.itemsize == 4
    assert loaded.config.max_batch_tokens == DEFAULT_BATCH_TOKENS[loaded.device.type == "cuda"]
    assert (loaded.config.max_batch_size, loaded.config.attn_implementation) == (256, "sdpa")
    # ... and the embedding function comes back whole
    for field in ("attention", "pooling", "query_instruction", "exclude_instruction_from_pooling", "max_length",
                  "documents"):
        assert getattr(loaded.config, field) == getattr(exporting.config, field), field


def test_old_exports_still_load_runtime_keys_ignored_with_one_warning(model_path, tmp_path, caplog):
    out = copy_model(model_path("qwen2"), tmp_path / "old-export")
    (out / "diffembed.json").write_text(json.dumps({  # as an earlier version wrote it on a CPU box
        "family": "qwen2", "attention": "bidirectional", "pooling": "mean", "normalize": True,
        "query_template": "Instruct: {instruction}\nQuery: ", "query_instruction": None, "document_prefix": "",
        "exclude_instruction_from_pooling": False, "append_eos": False, "max_length": 64, "long_inputs": "chunk",
        "chunk_overlap": 8, "dtype": "fp32", "max_batch_tokens": 1024, "max_batch_size": 256,
        "attn_implementation": "eager", "dimensions": None,
    }))
    with caplog.at_level(logging.WARNING, logger="diffembed.models.loading"):
        emb = Embedder(EmbedderConfig(model=str(out), max_batch_tokens=4096, dtype="bf16"))
    warnings = [r for r in caplog.records if "ignoring runtime settings" in r.getMessage()]
    assert len(warnings) == 1 and "max_batch_tokens" in warnings[0].getMessage()
    assert (emb.config.max_batch_tokens, emb.config.dtype, emb.config.attn_implementation) == (4096, "bf16", "sdpa")
    assert emb.config.documents.windows == "mean" and emb.config.documents.overlap == 8  # chunk -> mean
    assert (emb.config.attention, emb.config.max_length) == ("bidirectional", 64)
    assert emb.encode_documents(["hello world"]).dtype == np.float32


def test_embedding_function_resolves_without_weights_as_the_embedder_does(model_path, tmp_path):
    """The store fingerprint's function (no weights loaded) equals the loaded Embedder's, for every family."""
    from diffembed.index.fingerprint import embedding_fingerprint, model_digest
    from diffembed.models.loading import resolve_embedding_function

    for family in ("bert", "dream", "qwen2", "llama", "mistral", "llada"):
        cfg = EmbedderConfig(model=model_path(family), max_batch_tokens=4096)
        assert resolve_embedding_function(cfg) == Embedder(cfg).config.embedding_function(), family
    # the model's identity is its content: a copy elsewhere has the same digest, other weights do not
    src = model_path("qwen2")
    copy = copy_model(src, tmp_path / "copy")
    assert model_digest(copy) == model_digest(src) != model_digest(model_path("llama"))
    a = embedding_fingerprint(EmbedderConfig(model=str(src)), 64, "cosine", True)
    b = embedding_fingerprint(EmbedderConfig(model=str(copy)), 64, "cosine", True)
    assert a["model"]["digest"] == b["model"]["digest"] and a["function"] == b["function"]
    c = embedding_fingerprint(EmbedderConfig(model=str(src), documents={"windows": "mean"}), 64, "cosine", True)
    assert c["function"]["documents"]["windows"] == "mean" != a["function"]["documents"]["windows"]
