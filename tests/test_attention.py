"""Attention modes: diffusion backbones see the whole sequence, causal AR ones only the past, pads nothing."""

from __future__ import annotations

import pytest
import torch

from diffembed import Embedder, EmbedderConfig


@pytest.fixture(scope="module")
def embedders(model_path):
    cache = {}

    def get(family: str, attention: str | None = None) -> Embedder:
        key = (family, attention)
        if key not in cache:
            cache[key] = Embedder(EmbedderConfig(model=model_path(family), attention=attention))
        return cache[key]

    return get


def hidden(emb: Embedder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return emb.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)


def two_sequences_differing_last(emb: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    ids = emb.tokenizer("diffusion models read both ways", add_special_tokens=False)["input_ids"]
    a = torch.tensor([ids])
    b = a.clone()
    b[0, -1] = (b[0, -1] + 7) % len(emb.tokenizer)  # another token in the last position
    return a, b


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_diffusion_first_token_sees_the_last(embedders, family):
    emb = embedders(family)
    assert emb.model.config.is_causal is False
    a, b = two_sequences_differing_last(emb)
    mask = torch.ones_like(a)
    first_a, first_b = hidden(emb, a, mask)[0, 0], hidden(emb, b, mask)[0, 0]
    assert not torch.allclose(first_a, first_b, atol=1e-5), "token 0 ignored a later token: attention is causal"


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_causal_ar_first_token_ignores_the_last(embedders, family):
    emb = embedders(family)
    assert emb.config.attention == "causal"
    a, b = two_sequences_differing_last(emb)
    mask = torch.ones_like(a)
    torch.testing.assert_close(hidden(emb, a, mask)[0, :-1], hidden(emb, b, mask)[0, :-1])


def test_ar_backbone_can_be_run_bidirectionally(embedders):
    emb = embedders("qwen2", "bidirectional")
    a, b = two_sequences_differing_last(emb)
    mask = torch.ones_like(a)
    assert not torch.allclose(hidden(emb, a, mask)[0, 0], hidden(emb, b, mask)[0, 0], atol=1e-5)


@pytest.mark.parametrize("family", ["dream", "llada", "qwen2", "llama", "mistral", "bert"])
def test_padded_positions_never_change_real_tokens(embedders, family):
    """Padding is a real mask, not a bias: whatever sits in padded slots, real states are identical."""
    emb = embedders(family)
    ids = torch.tensor([emb.tokenizer("pads must not leak into real tokens", add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]
    alone = hidden(emb, ids, torch.ones_like(ids))[0]
    gen = torch.Generator().manual_seed(0)
    for pad_len in (1, 5):
        junk = torch.randint(0, len(emb.tokenizer) - 1, (1, pad_len), generator=gen)
        padded = torch.cat([ids, junk], dim=1)  # (1, n + pad_len)
        mask = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, pad_len, dtype=torch.long)], dim=1)
        torch.testing.assert_close(hidden(emb, padded, mask)[0, :n], alone, atol=1e-5, rtol=1e-4)
