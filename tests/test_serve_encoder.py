"""The serving encoder's body (`EncoderImpl`, no Serve): token-id inputs give the vectors of the same text."""

from __future__ import annotations

import numpy as np
import pytest

from diffembed.serving.encoder import EncoderImpl, InvalidTokenIds

EMBEDDER = {"model": "all-MiniLM-L6-v2", "max_length": 32, "query_instruction": "Find the passage",
            "documents": {"windows": "mean", "overlap": 4, "prefix": "passage: "}}
TEXTS = ["The harbour is calm at night.",
         " ".join(f"Line {i} of a long report on glaciers and their retreat." for i in range(12))]


@pytest.fixture(scope="module")
def encoder():
    return EncoderImpl(EMBEDDER)


def content_ids(encoder, texts):
    return [encoder.embedder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("kind", ["document", "query"])
def test_token_ids_equal_text(encoder, kind):
    # the second text spans several windows: documents average them (mean), queries are truncated
    by_text = encoder.embed_unbatched(TEXTS, kind=kind, truncate=True)
    by_ids = encoder.embed_unbatched(content_ids(encoder, TEXTS), kind=kind, truncate=True)
    np.testing.assert_allclose(by_ids.vectors, by_text.vectors, atol=1e-6)
    assert by_ids.tokens == by_text.tokens


def test_query_instruction_applies_to_ids(encoder):
    ids = content_ids(encoder, TEXTS[:1])
    plain = encoder.embed_unbatched(ids, kind="query", instruction="")
    instructed = encoder.embed_unbatched(ids, kind="query")
    assert instructed.tokens[0] > plain.tokens[0]  # the configured instruction's tokens are in
    assert float(plain.vectors[0] @ instructed.vectors[0]) < 0.9999


@pytest.mark.parametrize("bad", [[[]], [[1, -3]], [[10**9]], [[1, True]]])
def test_bad_token_ids(encoder, bad):
    with pytest.raises(InvalidTokenIds, match=r"input\[0\]"):
        encoder.embed_unbatched(bad)


def test_info_names_vocab_and_instruction(encoder):
    info = encoder.info()
    assert info["vocab_size"] == len(encoder.embedder.tokenizer) > 1000
    assert info["query_instruction"] == "Find the passage"


def test_a_too_long_first_window_document_names_its_whole_length():
    """Without truncate, a `first`-policy document longer than max_length is refused with its real token count,
    although its window was tokenized from a prefix of the text (`Embedder.first_tokens`)."""
    from diffembed.serving.encoder import InputTooLong

    encoder = EncoderImpl({**EMBEDDER, "documents": {"windows": "first", "prefix": "passage: "}})
    text = " ".join(f"Line {i} of a long report on glaciers and their retreat." for i in range(400))
    window = encoder.embedder.document_segments([text], windows="first")[0]
    around = len(window.ids) - (window.token_span[1] - window.token_span[0])  # specials and the policy's prefix
    whole = around + len(encoder.embedder.tokenize([text], offsets=False)[0][0])  # ... + every content token
    assert window.text_tokens < whole - around  # the window read a prefix of the text only
    with pytest.raises(InputTooLong, match=rf"input\[0\] has {whole} tokens, more than max_length=32"):
        encoder.embed_unbatched([text], kind="document", truncate=False)
    assert encoder.embed_unbatched([text], kind="document", truncate=True).vectors.shape[0] == 1
