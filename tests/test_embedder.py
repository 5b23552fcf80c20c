"""The Embedder: batched == single, equals the reference encoder, instructions, long inputs, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.models.loading import packaged_minilm_path

TEXTS = [
    "short",
    "a medium length sentence about retrieval with dense vectors",
    "diffusion language models attend in both directions " * 12,
    "why",
    "the paper fine-tunes Dream with LoRA and InfoNCE " * 4,
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.mark.parametrize("family", ["dream", "llada", "qwen2", "llama", "mistral", "bert"])
@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_padding_invariance(model_path, family, pooling):
    """A text alone and inside a padded, length-mixed batch gets the same vector."""
    attention = "bidirectional" if pooling == "cls" else None  # cls with causal attention is a config error
    emb = Embedder(EmbedderConfig(model=model_path(family), pooling=pooling, attention=attention,
                                  max_batch_tokens=1 << 16))
    batched = emb.encode_documents(TEXTS)
    assert len(emb.batches(emb.document_segments(TEXTS))) == 1  # really one padded batch
    single = np.concatenate([emb.encode_documents([t]) for t in TEXTS])
    assert cosine_rows(batched, single).min() >= 0.9999


def test_token_budget_batches_keep_input_order(minilm):
    small = Embedder(EmbedderConfig(max_batch_tokens=64), backbone=minilm.backbone)
    segments = small.document_segments(TEXTS)
    groups = small.batches(segments)
    assert len(groups) > 1
    for group in groups:  # padded size within budget (a single over-long segment may stand alone)
        width = max(len(segments[i].ids) for i in group)
        assert width * len(group) <= 64 or len(group) == 1
    assert sorted(i for g in groups for i in g) == list(range(len(segments)))
    np.testing.assert_allclose(small.encode_documents(TEXTS), minilm.encode_documents(TEXTS), atol=1e-5)


def test_minilm_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
    texts = TEXTS + ["A man is eating food.", "Ein Satz auf Deutsch.", "x " * 400]  # the last one is truncated
    ours = minilm.encode_documents(texts)
    theirs = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert cosine_rows(ours, theirs).min() >= 0.9999


def test_instruction_changes_the_query_embedding(minilm):
    q = ["how do diffusion models embed text"]
    plain = minilm.encode_queries(q)
    a = minilm.encode_queries(q, instruction="Retrieve passages that answer the question")
    b = minilm.encode_queries(q, instruction="Find duplicate questions")
    assert cosine_rows(plain, a)[0] < 0.9999 and cosine_rows(a, b)[0] < 0.9999


def test_instruction_excluded_pooling_leaves_instruction_tokens_out(minilm):
    cfg = EmbedderConfig(exclude_instruction_from_pooling=True)
    emb = Embedder(cfg, backbone=minilm.backbone)
    instruction = "Retrieve passages that answer the question"
    seg = emb.query_segments(["diffusion embeddings"], instruction)[0]
    prefix_tokens = len(emb.tokenizer(emb.query_prefix(instruction), add_special_tokens=False)["input_ids"])
    # [CLS] counted, instruction tokens not, query tokens and [SEP] counted
    assert seg.pool_mask[0] == 1
    assert seg.pool_mask[1 : 1 + prefix_tokens] == [0] * prefix_tokens
    assert all(seg.pool_mask[1 + prefix_tokens :])
    # The vector is the mean over exactly the unmasked positions of the instructed sequence.
    import torch

    batch = emb.collate([seg])
    with torch.inference_mode():
        hidden = emb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[0]
    keep = torch.tensor(seg.pool_mask, dtype=torch.bool)
    expected = torch.nn.functional.normalize(hidden[keep].mean(0), dim=0).numpy()
    np.testing.assert_allclose(emb.encode_queries(["diffusion embeddings"], instruction)[0], expected, atol=1e-5)
    # ... and differs from pooling that includes the instruction.
    included = minilm.encode_queries(["diffusion embeddings"], instruction)[0]
    assert float(included @ expected) < 0.9999


def test_chunked_documents(minilm):
    emb = Embedder(EmbedderConfig(max_length=32, documents={"windows": "best", "overlap": 8}), backbone=minilm.backbone)
    long_doc = " ".join(f"sentence number {i} talks about topic {i % 7}." for i in range(40))
    docs = ["a short one", long_doc]
    chunks = emb.encode_document_windows(docs)
    n_tokens = len(emb.tokenizer(long_doc, add_special_tokens=False)["input_ids"])
    budget = emb.content_budget  # 30 content tokens per window: 32 minus [CLS] and [SEP]
    assert budget == 30
    spans = chunks.token_spans[chunks.text_index == 1]
    assert spans[0][0] == 0 and spans[-1][1] == n_tokens  # windows cover the whole document
    assert all(b[0] == a[1] - 8 for a, b in zip(spans, spans[1:]))  # consecutive windows overlap by 8 tokens
    assert all(end - start <= budget for start, end in spans)
    assert list(chunks.chunk_index[chunks.text_index == 1]) == list(range(len(spans)))
    # Char spans point at the text each window holds.
    first_chars = chunks.char_spans[chunks.text_index == 1][0]
    assert long_doc[first_chars[0] : first_chars[1]].startswith("sentence number 0")
    # Window vectors equal encoding the window's text on its own (same code path).
    s, e = chunks.char_spans[chunks.text_index == 1][1]
    alone = emb.encode_documents([long_doc[s:e]])[0]
    assert float(alone @ chunks.vectors[chunks.text_index == 1][1]) > 0.999
    # `best` has no single vector for a document of several windows
    with pytest.raises(ValueError, match="documents.windows: best"):
        emb.encode_documents(docs)
    # `mean`: one vector per document, differing from plain truncation for the long one only.
    mean = Embedder(EmbedderConfig(max_length=32, documents={"windows": "mean", "overlap": 8}), backbone=minilm.backbone)
    pooled = mean.encode_documents(docs)
    truncated = Embedder(EmbedderConfig(max_length=32), backbone=minilm.backbone).encode_documents(docs)
    assert pooled.shape == (2, 384)
    np.testing.assert_allclose(pooled[0], truncated[0], atol=1e-5)
    assert float(pooled[1] @ truncated[1]) < 0.999
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)


def test_matryoshka_dimensions(minilm):
    emb = Embedder(EmbedderConfig(dimensions=64), backbone=minilm.backbone)
    full = minilm.encode_documents(TEXTS)
    cut = emb.encode_documents(TEXTS)
    assert cut.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    assert cosine_rows(cut, full[:, :64]).min() > 0.9999
    with pytest.raises(ConfigError, match="dimensions"):
        Embedder(EmbedderConfig(dimensions=1000), backbone=minilm.backbone)


def test_last_token_pooling_appends_eos(model_path):
    emb = Embedder(EmbedderConfig(model=model_path("qwen2")))
    assert emb.config.pooling == "last" and emb.config.append_eos
    seg = emb.document_segments(["hello world"])[0]
    assert seg.ids[-1] == emb.tokenizer.eos_token_id


def test_empty_list_gives_empty_array(minilm):
    for out in (minilm.encode_documents([]), minilm.encode_queries([])):
        assert out.shape == (0, 384) and out.dtype == np.float32
    assert minilm.encode_document_windows([]).vectors.shape == (0, 384)


@pytest.mark.parametrize("bad, index", [(["ok", ""], 1), (["ok", "fine", "   "], 2), ([None], 0), (["a", 3], 1)])
def test_bad_texts_name_the_index(minilm, bad, index):
    for encode in (minilm.encode_documents, minilm.encode_queries):
        with pytest.raises(ValueError, match=rf"\[{index}\]"):
            encode(bad)


def test_a_bare_string_is_rejected(minilm):
    with pytest.raises(ValueError, match="list of strings"):
        minilm.encode_documents("not a list")


def test_compiled_inference_equals_eager():
    """`compile: true` runs inference through torch.compile (built by warm_up) with the same vectors; a forward
    with autograd on (training) uses the plain module."""
    import torch

    texts = ["The harbour is calm at night.", "A lighthouse on the cliff " * 6, "short"]
    eager = Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=32))
    compiled = Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=32, compile=True),
                        backbone=eager.backbone)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    compiled.warm_up()
    assert compiled._inference_model is not compiled.model
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 1  # one dynamic graph; a one-row batch (its own graph if compiled) runs eagerly
    np.testing.assert_allclose(compiled.encode_documents(texts), eager.encode_documents(texts), atol=1e-5)
    np.testing.assert_allclose(compiled.encode_queries(texts[:2]), eager.encode_queries(texts[:2]), atol=1e-5)
    # one text alone (a search query) and one document alone: run eagerly, nothing compiles in a call
    np.testing.assert_allclose(compiled.encode_queries(texts[2:]), eager.encode_queries(texts[2:]), atol=1e-5)
    np.testing.assert_allclose(compiled.encode_documents(texts[:1]), eager.encode_documents(texts[:1]), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    batch = compiled.collate(compiled.document_segments(texts[:1]))
    with torch.enable_grad():
        compiled.pooled(batch).sum().backward()  # the eager module: gradients reach the shared weights
    assert any(p.grad is not None for p in compiled.model.parameters())


def awkward_texts(seed: int, n: int = 40) -> list[str]:
    """Long texts whose prefix cuts fall among what tokenizers treat specially: runs of spaces, newlines after
    punctuation, tabs, accents, CJK without spaces, very long words, digits, emoji."""
    import random

    rng = random.Random(seed)
    pieces = ["the", "retrieval", "Modèle", "naïve", "e.g.", "end.\n\n", "x\t\ty", "  spaced", "1234567",
              "東京大学の研究", "🙂🙂", "a" * 300, "don't", "(paren)", "—dash—", "\r\nline", "ÅNGSTRÖM", "über"]
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(200, 1500))) for _ in range(n)]


@pytest.mark.parametrize("family", ["dream", "llada", "qwen2", "llama", "mistral", "bert"])
def test_first_windows_tokenize_a_prefix_with_the_whole_texts_tokens(model_path, family, monkeypatch):
    """A `first` window reads a long text's first tokens from a prefix only (`Embedder.first_tokens`); its ids,
    token and character spans and vectors are those of the whole text's tokenization, and a window cut short
    still shows as one."""
    import dataclasses

    from diffembed.models import embedder as embedder_module

    emb = Embedder(EmbedderConfig(model=model_path(family), max_length=48))
    texts = awkward_texts(0) + ["short text"] + ["word " * 2000]
    need = emb.content_budget
    full_ids, full_offsets = emb.tokenize(texts)
    # Prefixes of about `ratio` characters per token of the window: at the small ratios a prefix has barely more
    # tokens than the window, and its last word (cut before "\n\n", inside a run of spaces...) is within reach.
    shipped = embedder_module.FIRST_WINDOW_CHARS_PER_TOKEN
    for ratio in sorted({2, 3, 4, shipped, 12}):
        monkeypatch.setattr(embedder_module, "FIRST_WINDOW_CHARS_PER_TOKEN", ratio)
        ids, offsets = emb.first_tokens(texts, need)
        for i in range(len(texts)):
            assert ids[i][:need] == full_ids[i][:need], (family, ratio, i)
            assert offsets[i][:need] == full_offsets[i][:need], (family, ratio, i)
            assert (len(ids[i]) > need) == (len(full_ids[i]) > need), (family, ratio, i)
        # at the shipped ratio a plain long text is read from a prefix (an awkward one may need the whole text)
        assert ratio != shipped or len(ids[-1]) < len(full_ids[-1])
    monkeypatch.setattr(embedder_module, "FIRST_WINDOW_CHARS_PER_TOKEN", shipped)
    segments = emb.document_segments(texts, windows="first")
    vectors = emb.encode_documents(texts)
    monkeypatch.setattr(embedder_module, "FIRST_WINDOW_CHARS_PER_TOKEN", 10**9)  # every text tokenized whole
    whole = emb.document_segments(texts, windows="first")
    assert [dataclasses.replace(s, text_tokens=0) for s in segments] == [
        dataclasses.replace(s, text_tokens=0) for s in whole]
    assert all((s.token_span[1] < s.text_tokens) == (w.token_span[1] < w.text_tokens)
               for s, w in zip(segments, whole))  # cut short, or not, alike
    np.testing.assert_array_equal(vectors, emb.encode_documents(texts))


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def test_first_tokens_never_trust_the_prefixs_last_word(model_path, monkeypatch):
    """With a real-style byte-level BPE (Qwen2's split, merges such as "!!!\n\n"), a prefix's last word can tokenize
    differently from the whole text ("!!" "!" alone), even within the window when the prefix has barely more tokens
    than it; `first_tokens` must notice (character offsets) and still give the whole text's first tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from diffembed.models import embedder as embedder_module

    corpus = [f"Item {i} ends here....\n\nNext item {i}?!:\n  indented words follow!!!\n\n" for i in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus + ["?!:\n" * 50, ".....\n\n" * 3, "!!!!\n"], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    emb = Embedder(EmbedderConfig(model=model_path("qwen2")))
    emb.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    texts = ["".join(corpus[i:i + 12]) for i in range(0, 120, 7)] + ["x " + "wait... ok!? fine:: done!!!!! " * 40]
    full, full_offsets = emb.tokenize(texts)
    fooled = 0  # cases where a prefix with more tokens than the window still differs within it
    for need in range(8, 64):
        for ratio in (1.5, 2, 3, 4):
            monkeypatch.setattr(embedder_module, "FIRST_WINDOW_CHARS_PER_TOKEN", ratio)
            got, got_offsets = emb.first_tokens(texts, need)
            for i, text in enumerate(texts):
                assert got[i][:need] == full[i][:need], (need, ratio, i)
                assert got_offsets[i][:need] == full_offsets[i][:need], (need, ratio, i)
                at = max(text.rfind(c, 0, int(need * ratio)) for c in " \n\t\r")
                prefix, _ = emb.tokenize([text[: len(text[:at].rstrip())]]) if at > 0 else ([[]], None)
                fooled += len(prefix[0]) > need and prefix[0][:need] != full[i][:need]
    assert fooled  # the check is needed: without it, some of these windows would be wrong
