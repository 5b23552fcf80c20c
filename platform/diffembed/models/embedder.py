"""The Embedder: the only code path from text to vectors (training, batch inference and serving use it).

Texts become *segments*: token windows wrapped in the tokenizer's special tokens, each carrying a pooling
mask (which tokens count in the mean) and its span in the source text. Segments are batched by a padded-token
budget over length-sorted inputs, run through the backbone, pooled, and put back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from diffembed.config import ConfigError, EmbedderConfig
from diffembed.models.loading import Backbone, load_backbone, quiet_transformers, with_saved_config
from diffembed.models.pooling import finish, pool


# Padded tokens per forward pass by device (cpu, cuda): on CPU small batches stay in cache and measured
# fastest (bench/encode_throughput.py); a GPU wants large ones.
DEFAULT_BATCH_TOKENS = {False: 1024, True: 32768}


@dataclass
class Segment:
    ids: list[int]
    pool_mask: list[int]
    source: int  # index of the input text
    token_span: tuple[int, int]  # [start, end) in the text's content tokens (special tokens excluded)
    char_span: tuple[int, int]  # [start, end) in the text as given (document prefix excluded)


@dataclass
class ChunkEmbeddings:
    """One vector per token window, for multi-point indexing."""

    vectors: np.ndarray  # (M, D) float32
    text_index: np.ndarray  # (M,) which input text each window came from
    chunk_index: np.ndarray  # (M,) window number within its text
    token_spans: np.ndarray  # (M, 2) content-token [start, end)
    char_spans: np.ndarray  # (M, 2) character [start, end)


def validate_texts(texts: Any, what: str = "texts") -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what}[{i}] is empty")
    return list(texts)


class Embedder:
    def __init__(self, config: EmbedderConfig | None = None, backbone: Backbone | None = None):
        config = with_saved_config(config or EmbedderConfig())
        self.backbone = backbone or load_backbone(config)
        self.model = self.backbone.model
        self.tokenizer = self.backbone.tokenizer
        self.device = next(self.model.parameters()).device
        # The resolved config: every default is filled in, so it can be saved next to exported weights.
        attention = self.backbone.attention
        pooling = config.pooling or self.backbone.family.default_pooling(attention)
        self.config = config.model_copy(
            update={
                "family": self.backbone.family.name,
                "attention": attention,
                "pooling": pooling,
                # Last-token pooling reads the state of a final EOS (encoders already end in [SEP]).
                "append_eos": (pooling == "last" and self.tokenizer.eos_token_id is not None)
                if config.append_eos is None
                else config.append_eos,
                "max_length": config.max_length or self.backbone.default_max_length,
                "max_batch_tokens": config.max_batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type == "cuda"],
            }
        )
        if self.config.append_eos and self.tokenizer.eos_token_id is None:
            raise ConfigError("append_eos is on but the tokenizer has no EOS token")
        self._prefix, self._suffix = self._special_tokens()
        hidden = self.model.config.hidden_size
        if self.config.dimensions is not None and self.config.dimensions > hidden:
            raise ConfigError(f"dimensions={self.config.dimensions} exceeds the model's width {hidden}")
        self.hidden_size = hidden
        self.dimension = self.config.dimensions or hidden

    # ---------------------------------------------------------------- tokenisation

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after content (e.g. [CLS] … [SEP], or <bos> …)."""
        probe = "hello world"
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        plain = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                prefix, suffix = list(full[:start]), list(full[start + len(plain) :])
                break
        else:  # tokenizers that change content when adding specials: treat all as content
            prefix, suffix = [], []
        eos = self.tokenizer.eos_token_id
        if self.config.append_eos and (not suffix or suffix[-1] != eos):
            suffix = suffix + [eos]
        return prefix, suffix

    @property
    def content_budget(self) -> int:
        """Content tokens per window once special tokens are in."""
        budget = self.config.max_length - len(self._prefix) - len(self._suffix)
        if budget < 1:
            raise ConfigError(f"max_length={self.config.max_length} leaves no room for content")
        return budget

    def query_prefix(self, instruction: str | None) -> str:
        instruction = instruction if instruction is not None else self.config.query_instruction
        if not instruction:
            return ""
        return self.config.query_template.format(instruction=instruction)

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        if not texts:
            return [], []
        with quiet_transformers():  # no "longer than the maximum" warning: windows are cut below
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _wrap(self, ids: list[int], pool_mask: list[int]) -> tuple[list[int], list[int]]:
        return (
            self._prefix + ids + self._suffix,
            [1] * len(self._prefix) + pool_mask + [1] * len(self._suffix),
        )

    def query_segments(
        self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None
    ) -> list[Segment]:
        """One segment per query: instruction prefix + query, truncated at the end (the instruction stays).

        `instruction` is one for all queries, or one per query (training rows carry their own).
        """
        texts = validate_texts(texts, "queries")
        if instruction is None or isinstance(instruction, str):
            prefixes = [self.query_prefix(instruction)] * len(texts)
        elif len(instruction) != len(texts):
            raise ValueError(f"got {len(instruction)} instructions for {len(texts)} queries")
        else:
            prefixes = [self.query_prefix(ins) for ins in instruction]
        ids, offsets = self._tokenize([p + t for p, t in zip(prefixes, texts)])
        budget = self.content_budget
        segments = []
        for i, (tok, off, prefix) in enumerate(zip(ids, offsets, prefixes)):
            tok, off = tok[:budget], off[:budget]
            exclude = bool(prefix) and self.config.exclude_instruction_from_pooling and self.config.pooling == "mean"
            # A token belongs to the instruction when it starts inside the prefix's characters.
            mask = [0 if exclude and start < len(prefix) else 1 for start, _ in off]
            if exclude and not any(mask):
                raise ValueError(f"queries[{i}] has no tokens left after the instruction at max_length")
            seg_ids, seg_mask = self._wrap(tok, mask)
            end_char = max(0, (off[-1][1] if off else 0) - len(prefix))
            segments.append(Segment(seg_ids, seg_mask, i, (0, len(tok)), (0, end_char)))
        return segments

    def document_segments(self, texts: Sequence[str], chunk: bool | None = None) -> list[Segment]:
        """Token windows of each document: one truncated window, or overlapping windows covering it all."""
        texts = validate_texts(texts, "documents")
        chunk = self.config.long_inputs == "chunk" if chunk is None else chunk
        pre = self.config.document_prefix
        ids, offsets = self._tokenize([pre + t for t in texts])
        budget = self.content_budget
        stride = budget - min(self.config.chunk_overlap, budget // 2) if chunk else budget
        segments = []
        for i, (tok, off) in enumerate(zip(ids, offsets)):
            starts = range(0, max(len(tok) - budget, 0) + 1, stride) if chunk else [0]
            starts = list(starts)
            if chunk and starts[-1] + budget < len(tok):
                starts.append(starts[-1] + stride)  # cover the tail
            for start in starts:
                end = min(start + budget, len(tok))
                seg_ids, seg_mask = self._wrap(tok[start:end], [1] * (end - start))
                chars = (
                    (max(0, off[start][0] - len(pre)), max(0, off[end - 1][1] - len(pre))) if end > start else (0, 0)
                )
                segments.append(Segment(seg_ids, seg_mask, i, (start, end), chars))
        return segments

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs as a document (after truncation), for usage accounting."""
        per_text = [0] * len(texts)
        for seg in self.document_segments(texts, chunk=False):
            per_text[seg.source] += len(seg.ids)
        return per_text

    # ---------------------------------------------------------------- model calls

    def collate(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        width = max(len(s.ids) for s in segments)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(segments), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(segments), width), dtype=torch.long)
        pool_mask = torch.zeros((len(segments), width), dtype=torch.long)
        for row, seg in enumerate(segments):  # right padding: positions 0..n-1 are the real tokens
            n = len(seg.ids)
            input_ids[row, :n] = torch.tensor(seg.ids)
            attention_mask[row, :n] = 1
            pool_mask[row, :n] = torch.tensor(seg.pool_mask)
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "pool_mask": pool_mask.to(self.device),
        }

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, H) float32 pooled hidden states; differentiable (training calls this)."""
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return pool(out.last_hidden_state, batch["attention_mask"], batch["pool_mask"], self.config.pooling)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) final embeddings (Matryoshka-truncated, normalised as configured); differentiable."""
        return finish(self.pooled(batch), self.config.dimensions, self.config.normalize)

    def batches(self, segments: Sequence[Segment]) -> list[list[int]]:
        """Segment indices grouped so that each batch's padded size stays within the token budget."""
        order = sorted(range(len(segments)), key=lambda i: len(segments[i].ids), reverse=True)
        groups, current, width = [], [], 0
        for i in order:
            n = len(segments[i].ids)
            new_width = max(width, n)
            if current and (
                new_width * (len(current) + 1) > self.config.max_batch_tokens
                or len(current) >= self.config.max_batch_size
            ):
                groups.append(current)
                current, new_width = [], n
            current.append(i)
            width = new_width
        if current:
            groups.append(current)
        return groups

    @torch.inference_mode()
    def _pooled_segments(self, segments: Sequence[Segment]) -> torch.Tensor:
        """(S, H) pooled vectors in segment order, computed in token-budget batches."""
        out = torch.empty((len(segments), self.hidden_size), dtype=torch.float32)
        for group in self.batches(segments):
            vectors = self.pooled(self.collate([segments[i] for i in group]))
            out[torch.tensor(group)] = vectors.cpu()
        return out

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dimension), dtype=np.float32)

    # ---------------------------------------------------------------- public API

    def encode_queries(
        self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None
    ) -> np.ndarray:
        """(N, D) float32, input order. `instruction` (one, or one per query) overrides the configured one."""
        segments = self.query_segments(texts, instruction)
        if not segments:
            return self._empty()
        return finish(self._pooled_segments(segments), self.config.dimensions, self.config.normalize).numpy()

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32, input order; long documents truncated or chunked-and-averaged per config."""
        segments = self.document_segments(texts)
        if not segments:
            return self._empty()
        pooled = self._pooled_segments(segments)  # (S, H)
        if len(segments) != len(texts):
            pooled = self._aggregate(segments, pooled, len(texts))
        return finish(pooled, self.config.dimensions, self.config.normalize).numpy()

    def encode_document_chunks(self, texts: Sequence[str], chunk: bool = True) -> ChunkEmbeddings:
        """Every window of every document as its own vector, with token and character spans.

        With `chunk=False` each document is one (truncated) window: same output type, one row per text.
        """
        segments = self.document_segments(texts, chunk=chunk)
        if segments:
            vectors = finish(self._pooled_segments(segments), self.config.dimensions, self.config.normalize).numpy()
        else:
            vectors = self._empty()
        chunk_index, seen = [], {}
        for seg in segments:
            chunk_index.append(seen.get(seg.source, 0))
            seen[seg.source] = chunk_index[-1] + 1
        return ChunkEmbeddings(
            vectors=vectors,
            text_index=np.array([s.source for s in segments], dtype=np.int64),
            chunk_index=np.array(chunk_index, dtype=np.int64),
            token_spans=np.array([s.token_span for s in segments], dtype=np.int64).reshape(-1, 2),
            char_spans=np.array([s.char_span for s in segments], dtype=np.int64).reshape(-1, 2),
        )

    @staticmethod
    def _aggregate(segments: Sequence[Segment], pooled: torch.Tensor, n_texts: int) -> torch.Tensor:
        """One vector per text: windows averaged, weighted by how many tokens each pooled."""
        weights = torch.tensor([float(sum(s.pool_mask)) for s in segments])  # (S,)
        index = torch.tensor([s.source for s in segments])  # (S,)
        total = torch.zeros((n_texts, pooled.shape[1])).index_add_(0, index, pooled * weights[:, None])
        norm = torch.zeros(n_texts).index_add_(0, index, weights)
        return total / norm[:, None]
