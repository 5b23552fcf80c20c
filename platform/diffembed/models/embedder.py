"""The Embedder: the only code path from text to vectors (training, batch inference and serving use it).

Texts become *segments*: token windows wrapped in the tokenizer's special tokens, each carrying a pooling
mask (which tokens count in the mean) and its span in the source text. Segments are batched by a padded-token
budget over length-sorted inputs, run through the backbone, pooled, and put back in input order.

Encoding is a pipeline: a background thread tokenises the texts in growing slices, cuts windows, sorts and
collates each slice's batches into (pinned) host tensors, while the device runs the batches already prepared;
pooled vectors stay on the device until the call ends (no synchronisation per batch). The same code path runs
on CPU and GPU.
"""

from __future__ import annotations

from contextlib import closing
import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from diffembed.config import ConfigError, EmbedderConfig
from diffembed.documents import Windows, titles_or_none
from diffembed.models.loading import (Backbone, load_backbone, quiet_transformers, resolve_defaults, resolve_dtype,
                                      with_saved_config)
from diffembed.models.pooling import finish, pool, pool_groups
from diffembed.models.prefetch import prefetch


# Padded tokens per forward pass by device (cpu, cuda): on CPU small batches stay in cache and measured
# fastest (bench/encode_throughput.py); a GPU wants large ones.
DEFAULT_BATCH_TOKENS = {False: 1024, True: 32768}
PREFETCH_BATCHES = 4  # collated batches the CPU side prepares ahead of the device
FIRST_SLICE, MAX_SLICE = 64, 2048  # texts tokenised per pipeline step: small first (the device starts early), then
# doubling up to MAX_SLICE
BUCKET_RATIO = 1.1  # windows wait for a batch among windows within 10 % of their length: little padding
# A `first` window reads a text's first tokens only: a text longer than this many characters per token of the
# window is tokenized from a prefix (`Embedder.first_tokens`), not whole.
FIRST_WINDOW_CHARS_PER_TOKEN = 6
_WHITESPACE = (" ", "\n", "\t", "\r")


@dataclass
class Segment:
    ids: list[int]
    pool_mask: list[int]
    source: int  # index of the input text
    token_span: tuple[int, int]  # [start, end) in the text's content tokens (special tokens excluded)
    char_span: tuple[int, int] | None  # [start, end) in the text as given (title, prefixes excluded); None when
    # not asked for (`spans=False`: no offsets are computed)
    text_tokens: int = 0  # content tokens of the whole text, so a caller can tell a window was cut short
    # Several vectors from one window (late-chunking chunks, the mask tokens of a multivector): [start, end)
    # positions in `ids` whose final states are averaged into one vector each; None = one vector (pool_mask).
    groups: list[tuple[int, int]] | None = None
    group_spans: list[tuple[int, int]] | None = None  # late_chunk: each chunk's content-token [start, end)
    group_chars: list[tuple[int, int]] | None = None  # ... and its character [start, end) (when spans are asked)

    @property
    def n_vectors(self) -> int:
        return len(self.groups) if self.groups is not None else 1


@dataclass
class ChunkEmbeddings:
    """The vectors an index stores for documents: one per document, or one per window (multi-point)."""

    vectors: np.ndarray  # (M, D) float32; (M, K, D) for a multivector (mask_vectors: multi)
    text_index: np.ndarray  # (M,) which input text each window came from
    chunk_index: np.ndarray  # (M,) window number within its text
    token_spans: np.ndarray  # (M, 2) content-token [start, end)
    char_spans: np.ndarray  # (M, 2) character [start, end)


class TokenIdError(ValueError):
    """A token-id input that is empty or holds an id outside the model's vocabulary."""


def validate_texts(texts: Any, what: str = "texts") -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise ValueError(f"{what} must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{what}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what}[{i}] is empty")
    return list(texts)


def _char_span(offsets: list[tuple[int, int]], start: int, end: int, shift: int) -> tuple[int, int]:
    """Characters [start, end) of content tokens [start, end), relative to the text (the joined title's `shift`
    characters excluded)."""
    if end <= start:
        return (0, 0)
    return (max(0, offsets[start][0] - shift), max(0, offsets[end - 1][1] - shift))


class Embedder:
    def __init__(self, config: EmbedderConfig | None = None, backbone: Backbone | None = None):
        config = with_saved_config(config or EmbedderConfig())
        self.backbone = backbone or load_backbone(config)
        self.model = self.backbone.model
        self.tokenizer = self.backbone.tokenizer
        self.device = next(self.model.parameters()).device
        # The resolved config: every default is filled in, so it can be saved next to exported weights.
        self.config = resolve_defaults(
            config, self.backbone.family, self.backbone.attention, self.tokenizer, self.backbone.default_max_length
        ).model_copy(update={
            "max_batch_tokens": config.max_batch_tokens or DEFAULT_BATCH_TOKENS[self.device.type == "cuda"],
            "dtype": resolve_dtype(config.dtype, self.device),
        })
        if self.config.append_eos and self.tokenizer.eos_token_id is None:
            raise ConfigError("append_eos is on but the tokenizer has no EOS token")
        self._mask_id = self._mask_token() if self.config.pooling == "mask" else None
        if self.config.documents.windows == "late_chunk" and self.config.pooling != "mean":
            raise ConfigError(f"documents.windows: late_chunk pools each chunk's token states (a mean); with "
                              f"pooling: {self.config.pooling} queries would be read differently — use pooling: mean")
        self._prefix, self._suffix = self._special_tokens()
        hidden = self.model.config.hidden_size
        if self.config.dimensions is not None and self.config.dimensions > hidden:
            raise ConfigError(f"dimensions={self.config.dimensions} exceeds the model's width {hidden}")
        self.hidden_size = hidden
        self.dimension = self.config.dimensions or hidden
        # Bidirectional attention through SDPA takes a key-padding mask directly (see `pooled`); eager attention
        # wants an additive float mask and flash-attention a 2-D one, so they get the 2-D mask as before.
        self._key_padding_mask = (self.config.attention == "bidirectional"
                                  and getattr(self.model.config, "_attn_implementation", None) == "sdpa")
        # Inference (no autograd) may run through a compiled module sharing the weights; training never does.
        self._inference_model = torch.compile(self.model, dynamic=True) if self.config.compile else self.model

    def _mask_token(self) -> int:
        """The family's mask token id (Dream <|mask|>, LLaDA <|mdm_mask|>, BERT [MASK]) for mask-token readout."""
        mask = getattr(self.model.config, "mask_token_id", None)
        if mask is None:
            mask = self.tokenizer.mask_token_id
        if mask is None:
            raise ConfigError(f"pooling: mask needs a mask token, and {self.config.model} has none (no "
                              "mask_token_id in config.json, no mask token in the tokenizer)")
        return int(mask)

    @property
    def multivector(self) -> bool:
        """Each input is `config.mask_tokens` vectors (mask readout, `mask_vectors: multi`), scored by MaxSim."""
        return self.config.multivector

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
    def special_tokens(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the content of every segment."""
        return list(self._prefix), list(self._suffix)

    @property
    def content_budget(self) -> int:
        """Content tokens per window once special tokens are in."""
        budget = self.config.max_length - len(self._prefix) - len(self._suffix)
        if self._mask_id is not None:
            budget -= self.config.mask_tokens
        if budget < 1:
            raise ConfigError(f"max_length={self.config.max_length} leaves no room for content")
        return budget

    def query_prefix(self, instruction: str | None) -> str:
        instruction = instruction if instruction is not None else self.config.query_instruction
        if not instruction:
            return ""
        return self.config.query_template.format(instruction=instruction)

    def tokenize(self, texts: list[str], offsets: bool = True
                 ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        """Content token ids (no special tokens) and, if asked, the character offsets of each text; never
        truncated. Offsets cost as much as the ids to build: callers that need no character spans skip them."""
        if not texts:
            return [], ([] if offsets else None)
        with quiet_transformers():  # no "longer than the maximum" warning: windows are cut below
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets,
                                 return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"], (enc["offset_mapping"] if offsets else None)

    def _tokenize_unique(self, texts: list[str]) -> dict[str, list[int]]:
        unique = sorted(set(texts))
        ids, _ = self.tokenize(unique)
        return dict(zip(unique, ids))

    def _wrap(self, ids: list[int], pool_mask: list[int], head: list[int] | None = None
              ) -> tuple[list[int], list[int], list[tuple[int, int]] | None]:
        """Content -> (segment ids, pool mask, groups): `head` (default: the tokenizer's leading specials) and
        the trailing specials around it. Mean pooling counts the specials too; mask readout puts the mask tokens
        after the content and pools them only (each its own group for a multivector)."""
        head = self._prefix if head is None else head
        if self._mask_id is None:
            return head + ids + self._suffix, [1] * len(head) + pool_mask + [1] * len(self._suffix), None
        k, start = self.config.mask_tokens, len(head) + len(ids)
        groups = [(start + j, start + j + 1) for j in range(k)] if self.multivector else None
        return (head + ids + [self._mask_id] * k + self._suffix,
                [0] * (start) + [1] * k + [0] * len(self._suffix), groups)

    def query_segments(
        self, texts: Sequence[str], instruction: str | Sequence[str | None] | None = None
    ) -> list[Segment]:
        """One segment per query: instruction prefix + query, truncated at the end (the instruction stays).

        `instruction` is one for all queries, or one per query (training rows carry their own).
        The prefix (without its trailing whitespace) and the query (with it, so a byte-level BPE sees " word"
        as in running text) are tokenised separately and joined, so instruction and query never share a
        token and excluding the instruction from mean pooling is exact on token boundaries.
        """
        texts = validate_texts(texts, "queries")
        prefixes = self._query_prefixes(len(texts), instruction)
        cores = [p.rstrip() for p in prefixes]
        tails = [p[len(c):] for p, c in zip(prefixes, cores)]
        ids, offsets = self.tokenize([tail + t for tail, t in zip(tails, texts)])
        return self._query_segments(ids, offsets, cores, tails)

    def _query_prefixes(self, n: int, instruction: str | Sequence[str | None] | None) -> list[str]:
        if instruction is None or isinstance(instruction, str):
            return [self.query_prefix(instruction)] * n
        if len(instruction) != n:
            raise ValueError(f"got {len(instruction)} instructions for {n} queries")
        return [self.query_prefix(ins) for ins in instruction]

    def _query_segments(self, ids: list[list[int]], offsets: list[list[tuple[int, int]]] | None,
                        cores: list[str], tails: list[str]) -> list[Segment]:
        core_ids = self._tokenize_unique([c for c in cores if c])
        budget = self.content_budget
        exclude = self.config.exclude_instruction_from_pooling and self.config.pooling == "mean"
        segments = []
        for i, (tok, core, tail) in enumerate(zip(ids, cores, tails)):
            instr = core_ids.get(core, []) if core else []
            keep = budget - len(instr)
            if keep < 1 or not tok:
                raise ValueError(f"queries[{i}] has no tokens left after the instruction at "
                                 f"max_length={self.config.max_length}")
            kept = tok[:keep]
            mask = [0 if exclude else 1] * len(instr) + [1] * len(kept)
            seg_ids, seg_mask, groups = self._wrap(instr + kept, mask)
            chars = None
            if offsets is not None:
                chars = (0, max(0, offsets[i][len(kept) - 1][1] - len(tail)))
            segments.append(Segment(seg_ids, seg_mask, i, (0, len(kept)), chars, len(tok), groups))
        return segments

    def check_token_ids(self, ids: Any, what: str = "inputs") -> list[list[int]]:
        """Token-id inputs (the tokenizer's own ids, content only: no special tokens) as lists of ints, or a
        TokenIdError naming the first input that is empty or holds an id outside the vocabulary."""
        vocab = len(self.tokenizer)
        out = []
        for i, row in enumerate(ids):
            row = list(row)
            if not row:
                raise TokenIdError(f"{what}[{i}] is empty")
            bad = next((t for t in row if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise TokenIdError(f"{what}[{i}] holds {bad!r}, not a token id of this model (0 to {vocab - 1})")
            out.append(row)
        return out

    def query_segments_from_ids(self, ids: Sequence[Sequence[int]],
                                instruction: str | Sequence[str | None] | None = None,
                                what: str = "queries") -> list[Segment]:
        """`query_segments` for inputs given as token ids (checked by `check_token_ids`, errors naming
        `what[i]`); no character spans."""
        ids = self.check_token_ids(ids, what)
        prefixes = self._query_prefixes(len(ids), instruction)
        cores = [p.rstrip() for p in prefixes]
        return self._query_segments(ids, None, cores, [""] * len(ids))

    def document_segments_from_ids(self, ids: Sequence[Sequence[int]], windows: Windows | None = None,
                                   what: str = "documents") -> list[Segment]:
        """`document_segments` for documents given as token ids (checked by `check_token_ids`, errors naming
        `what[i]`); no character spans."""
        ids = self.check_token_ids(ids, what)
        return self._windows(ids, None, [None] * len(ids), windows, 0)

    def document_segments(
        self, texts: Sequence[str], titles: Sequence[str | None] | None = None, windows: Windows | None = None,
        spans: bool = True,
    ) -> list[Segment]:
        """The token windows of each document under the document policy (`config.documents`).

        The title is joined as the policy says, and the policy's prefix goes before the content of every
        window. `windows` overrides the policy's (training embeds one `first` window per document).
        Character spans are relative to the text (the joined title excluded); `spans=False` skips them
        (`char_span` is None) and the offsets they need.
        """
        texts = validate_texts(texts, "documents")
        return self._document_segments(texts, titles_or_none(titles, len(texts)), windows, spans)

    def _document_segments(self, texts: Sequence[str], titles: Sequence[str | None], windows: Windows | None,
                           spans: bool, first_source: int = 0) -> list[Segment]:
        policy = self.config.documents
        joined = [policy.join(t, ti) for t, ti in zip(texts, titles)]
        if (windows or policy.windows) == "first":
            ids, offsets = self.first_tokens(joined, self.content_budget, offsets=spans)
        else:
            ids, offsets = self.tokenize(joined, offsets=spans)
        return self._windows(ids, offsets, titles, windows, first_source)

    def first_tokens(self, texts: list[str], need: int, offsets: bool = True
                     ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        """`tokenize`, for callers that read at most the first `need` tokens of each text: those come out the same,
        and a long text is tokenized from a prefix only (a 50k-token document read for a 4k window costs 4k).

        The prefix ends before a run of whitespace at most `need` x FIRST_WINDOW_CHARS_PER_TOKEN characters in.
        Tokenizers split words at whitespace, so only the prefix's last word (what follows its last whitespace) can
        tokenize differently from the whole text ("wait..." alone, "wait...\n\n" as one token in the whole): the
        prefix is used when its `need`-th token ends before that last word (character offsets tell), and the whole
        text is tokenized otherwise. Then a text has more tokens than `need` (`Segment.text_tokens`
        counts the prefix's: a window cut short still shows as one), and its first `need` ids and offsets are the
        whole text's."""
        limit = int(need * FIRST_WINDOW_CHARS_PER_TOKEN)
        cuts = {}  # text -> where its prefix ends: before a run of whitespace (the prefix ends in a word)
        for i, text in enumerate(texts):
            if len(text) > limit and (at := max(text.rfind(c, 0, limit) for c in _WHITESPACE)) > 0:
                if end := len(text[:at].rstrip()):
                    cuts[i] = end
        if not cuts:
            return self.tokenize(texts, offsets=offsets)
        ids: list[Any] = [None] * len(texts)
        offs: list[Any] | None = [None] * len(texts) if offsets else None
        prefix_ids, prefix_offs = self.tokenize([texts[i][:at] for i, at in cuts.items()], offsets=True)
        whole = [i for i in range(len(texts)) if i not in cuts]
        for (i, at), tok, off in zip(cuts.items(), prefix_ids, prefix_offs):
            last_word = max(texts[i].rfind(c, 0, at) for c in _WHITESPACE)  # the prefix's last word starts after it
            if len(tok) > need and off[need - 1][1] <= last_word:
                ids[i] = tok
                if offs is not None:
                    offs[i] = off
            else:
                whole.append(i)
        if whole:
            whole.sort()
            whole_ids, whole_offs = self.tokenize([texts[i] for i in whole], offsets=offsets)
            for k, i in enumerate(whole):
                ids[i] = whole_ids[k]
                if offs is not None:
                    offs[i] = whole_offs[k]
        return ids, offs

    def _windows(self, ids: list[list[int]], offsets: list[list[tuple[int, int]]] | None,
                 titles: Sequence[str | None], windows: Windows | None, first_source: int) -> list[Segment]:
        """Each document's token windows under the policy (character spans only when `offsets` are given)."""
        policy = self.config.documents
        windows = windows or policy.windows
        prefix_ids = self._tokenize_unique([policy.prefix])[policy.prefix] if policy.prefix else []
        budget = self.content_budget - len(prefix_ids)
        if budget < 1:
            raise ConfigError(f"documents.prefix leaves no room for content at max_length={self.config.max_length}")
        head = self._prefix + prefix_ids
        if windows == "late_chunk":
            return self._late_chunks(ids, offsets, titles, head, budget, first_source)
        stride = budget - min(policy.overlap, budget // 2)
        segments = []
        for i, tok in enumerate(ids):
            starts = [0]
            if windows != "first":
                starts = list(range(0, max(len(tok) - budget, 0) + 1, stride))
                if starts[-1] + budget < len(tok):
                    starts.append(starts[-1] + stride)  # cover the tail
            shift = policy.title_offset(titles[i]) if offsets is not None else 0
            for start in starts:
                end = min(start + budget, len(tok))
                chars = _char_span(offsets[i], start, end, shift) if offsets is not None else None
                seg_ids, seg_mask, groups = self._wrap(tok[start:end], [1] * (end - start), head)
                segments.append(Segment(seg_ids, seg_mask, first_source + i, (start, end), chars, len(tok), groups))
        return segments

    def _late_chunks(self, ids: list[list[int]], offsets: list[list[tuple[int, int]]] | None,
                     titles: Sequence[str | None], head: list[int], budget: int, first_source: int
                     ) -> list[Segment]:
        """Late chunking: macro-windows of up to `budget` content tokens, each owning consecutive chunks of
        `chunk_tokens` (a chunk is never cut by a window edge) and seeing up to `overlap` tokens of context
        before them (and after them, where the window has room). A document's last chunk, when shorter than half
        a chunk, joins the one before it."""
        policy = self.config.documents
        chunk = min(policy.chunk_tokens, budget)
        context = min(policy.overlap, budget // 2)
        own = max(chunk, (budget - context) // chunk * chunk)  # content tokens a window owns: whole chunks
        segments = []
        for i, tok in enumerate(ids):
            n = len(tok)
            shift = policy.title_offset(titles[i]) if offsets is not None else 0
            for start in range(0, max(n, 1), own):
                end = min(start + own, n)
                bounds = list(range(start, end, chunk)) + [end]  # chunk edges
                if len(bounds) > 2 and end == n and bounds[-1] - bounds[-2] < chunk // 2:
                    del bounds[-2]  # a short tail chunk joins the previous one
                lo = max(0, min(start - context, n - budget), end - budget)  # window: [lo, lo + budget) ∩ [0, n)
                hi = min(n, lo + budget)
                seg_ids = head + tok[lo:hi] + self._suffix
                spans = list(zip(bounds[:-1], bounds[1:]))
                groups = [(len(head) + a - lo, len(head) + b - lo) for a, b in spans]
                chars = None
                if offsets is not None:
                    chars = [_char_span(offsets[i], a, b, shift) for a, b in spans]
                segments.append(Segment(
                    seg_ids, [0] * len(head) + [1] * (hi - lo) + [0] * len(self._suffix), first_source + i,
                    (lo, hi), _char_span(offsets[i], lo, hi, shift) if offsets is not None else None, n,
                    groups, spans, chars))
        return segments

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs as a document (every window, special tokens included), for usage accounting."""
        per_text = [0] * len(texts)
        for seg in self.document_segments(texts, spans=False):
            per_text[seg.source] += len(seg.ids)
        return per_text

    # ---------------------------------------------------------------- model calls

    def collate(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """Right-padded (B, W) input_ids / attention_mask / pool_mask on the model's device."""
        return self.to_device(self.collate_host(segments))

    def collate_host(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """Right-padded (B, W) int64 tensors in host memory (pinned when the model is on CUDA), built with
        vectorised numpy: one flat copy of all ids, no per-token Python work."""
        lengths = np.fromiter((len(s.ids) for s in segments), dtype=np.int64, count=len(segments))  # (B,)
        width, total = int(lengths.max()), int(lengths.sum())
        valid = np.arange(width)[None, :] < lengths[:, None]  # (B, W): positions 0..n-1 are the real tokens
        input_ids = np.full((len(segments), width), self.tokenizer.pad_token_id, dtype=np.int64)
        input_ids[valid] = np.fromiter(chain.from_iterable(s.ids for s in segments), dtype=np.int64, count=total)
        pool_mask = np.zeros((len(segments), width), dtype=np.int64)
        pool_mask[valid] = np.fromiter(chain.from_iterable(s.pool_mask for s in segments), dtype=np.int64,
                                       count=total)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
            "pool_mask": torch.from_numpy(pool_mask),
        }
        if any(s.groups is not None for s in segments):
            # Several vectors per window: (B, W) group number of each pooled token (-1: none); a window without
            # groups is one group over its pool mask.
            group_index = np.where(pool_mask > 0, 0, -1)
            for row, seg in enumerate(segments):
                if seg.groups is not None:
                    group_index[row] = -1
                    for g, (a, b) in enumerate(seg.groups):
                        group_index[row, a:b] = g
            batch["group_index"] = torch.from_numpy(group_index)
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        if "group_index" in batch:  # (B,) stays on the host: it sizes the output without a device sync
            batch["group_counts"] = torch.tensor([s.n_vectors for s in segments], dtype=torch.int64)
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors to the model's device (asynchronous copies from pinned memory on CUDA)."""
        if self.device.type == "cpu":
            return batch
        return {k: v if k == "group_counts" else v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(R, H) float32 pooled hidden states, R = B (one vector per window) or, for a batch with groups, each
        window's groups in order; differentiable (training calls this)."""
        mask = batch["attention_mask"]
        if self._key_padding_mask:
            # (B, 1, 1, T): every query attends to the real keys; padded queries' outputs are never pooled. Given
            # ready-made, transformers uses it as-is: no (B, 1, T, T) mask is built and no host sync checks it.
            mask = mask.bool()[:, None, None, :]
        # Compiled: one row (a search query sent alone) runs eagerly. torch.compile specialises a dimension of size
        # 1, so a compiled one-row batch would be a second graph to build at start-up (~13 s of a 44 s warm-up on
        # one core) to save ~3 ms per lone row (bench/compile_warmup.py). Never uncompiled: a training worker's
        # no-grad passes must all take one path, or ZeRO-3 ranks stop gathering parameters in step (deadlock).
        one_row = self.config.compile and batch["input_ids"].shape[0] == 1
        model = self.model if torch.is_grad_enabled() or one_row else self._inference_model
        out = model(input_ids=batch["input_ids"], attention_mask=mask)
        if "group_index" in batch:
            return pool_groups(out.last_hidden_state, batch["group_index"], batch["group_counts"])
        return pool(out.last_hidden_state, batch["attention_mask"], batch["pool_mask"], self.config.pooling)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) final embeddings (Matryoshka-truncated, normalised as configured), (B, K, D) for a multivector;
        differentiable."""
        vectors = finish(self.pooled(batch), self.config.dimensions, self.config.normalize)
        if self.multivector:
            return vectors.view(batch["input_ids"].shape[0], self.config.mask_tokens, -1)  # (B*K, D) -> (B, K, D)
        return vectors

    def batches(self, segments: Sequence[Segment]) -> list[list[int]]:
        """Segment indices grouped so that each batch's padded size stays within the token budget."""
        order = sorted(range(len(segments)), key=lambda i: len(segments[i].ids), reverse=True)
        groups, current, width = [], [], 0
        for i in order:
            n = len(segments[i].ids)
            new_width = max(width, n)
            if current and not self._fits(new_width, len(current) + 1):
                groups.append(current)
                current, new_width = [], n
            current.append(i)
            width = new_width
        if current:
            groups.append(current)
        return groups

    def _prepared(self, segments: Sequence[Segment]
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]]:
        """(segment indices, their sources, collated host batch) per token-budget batch."""
        for group in self.batches(segments):
            yield self._prepared_batch(segments, group)

    def _fits(self, width: int, rows: int) -> bool:
        """Whether `rows` windows padded to `width` stay within the batch budgets (tokens and rows)."""
        return rows <= self.config.max_batch_size and width * rows <= self.config.max_batch_tokens

    def _is_full(self, segments: Sequence[Segment], group: Sequence[int]) -> bool:
        """A batch that another window (no longer than its longest) would not fit in."""
        return not self._fits(max(len(segments[i].ids) for i in group), len(group) + 1)

    def _prepared_batch(self, segments: Sequence[Segment], group: Sequence[int]
                        ) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
        rows = [segments[i] for i in group]
        sources = np.fromiter((s.source for s in rows), np.int64, count=len(rows))
        return np.asarray(group, dtype=np.int64), sources, self.collate_host(rows)

    def _run(self, prepared: Iterable[tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]],
             count: int | None = None) -> torch.Tensor:
        """Run prepared batches (computed by a background thread, PREFETCH_BATCHES ahead) through the model.

        Returns (S, H) float32 on CPU in segment order. Vectors stay on the device until the end, so the host
        never waits for a batch to finish before preparing the next."""
        done: list[tuple[np.ndarray, torch.Tensor]] = []
        with torch.inference_mode(), closing(prefetch(prepared, PREFETCH_BATCHES)) as batches:
            for index, sources, host in batches:
                if "group_counts" in host:  # each window's vectors are consecutive rows
                    index = np.repeat(index, host["group_counts"].numpy())
                done.append((index, self._pooled_or_split(self.to_device(host), sources)))
        if not done:
            return torch.empty((count or 0, self.hidden_size), dtype=torch.float32)
        # Rows back in segment order; a stable sort keeps each window's groups in their order.
        order = np.argsort(np.concatenate([i for i, _ in done]), kind="stable")  # (R,)
        return torch.cat([v for _, v in done])[torch.from_numpy(order).to(self.device)].cpu()  # (R, H)

    def _pooled_or_split(self, batch: dict[str, torch.Tensor], sources: np.ndarray) -> torch.Tensor:
        """`pooled(batch)`; on a device out-of-memory, the batch is retried as two halves (each trimmed to its own
        width), down to one segment, which then fails with an error naming its document."""
        try:
            return self.pooled(batch)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            rows = batch["input_ids"].shape[0]
            if rows == 1:
                raise ValueError(
                    f"input {int(sources[0])}: one window of {int(batch['attention_mask'].sum())} tokens does not "
                    f"fit in {self.device} memory; lower max_length") from None
        half = rows // 2
        parts = []
        for part in (slice(0, half), slice(half, rows)):
            width = int(batch["attention_mask"][part].sum(dim=1).max())
            sub = {k: v[part] if v.dim() == 1 else v[part, :width] for k, v in batch.items()}  # (b, w): trimmed
            parts.append(self._pooled_or_split(sub, sources[part]))
        return torch.cat(parts)

    def embed_segments(self, segments: Sequence[Segment]) -> torch.Tensor:
        """(R, H) float32 pooled vectors in segment order (R = S, or each segment's `n_vectors` rows in turn),
        computed in token-budget batches (no gradient).

        The segment-level entry point for callers that batch segments themselves (Serve): follow it with
        `document_vectors` / `finish`.
        """
        return self._run(self._prepared(segments), sum(s.n_vectors for s in segments))

    def _embed_documents(self, texts: Sequence[str], titles: Sequence[str | None] | None, spans: bool
                         ) -> tuple[list[Segment], torch.Tensor]:
        """All windows of the documents and their (S, H) pooled vectors, tokenised slice by slice in the
        background while the device runs the previous slice's batches."""
        texts = validate_texts(texts, "documents")
        titles = titles_or_none(titles, len(texts))
        segments: list[Segment] = []

        def produce():
            # Slices grow from FIRST_SLICE (the device starts early) to MAX_SLICE. Windows wait in length buckets
            # (widths within a factor BUCKET_RATIO) until a bucket fills a batch, so batches are as tight as a global
            # length sort would make them; whatever is left at the end is batched together.
            start, size, buckets = 0, FIRST_SLICE, {}
            while start < len(texts):
                end = min(start + size, len(texts))
                first = len(segments)
                segments.extend(self._document_segments(texts[start:end], titles[start:end], None, spans,
                                                        first_source=start))
                touched = set()
                for i in range(first, len(segments)):
                    key = int(math.log(len(segments[i].ids)) / math.log(BUCKET_RATIO))
                    buckets.setdefault(key, []).append(i)
                    touched.add(key)
                for key in sorted(touched):  # a bucket without new windows holds less than a full batch
                    members = buckets[key]
                    groups = [[members[i] for i in g] for g in self.batches([segments[i] for i in members])]
                    full = [g for g in groups if self._is_full(segments, g)]
                    for group in full:
                        yield self._prepared_batch(segments, group)
                    if full:
                        done = {i for g in full for i in g}
                        buckets[key] = [i for i in members if i not in done]
                start, size = end, min(size * 2, MAX_SLICE)
            rest = [i for members in buckets.values() for i in members]
            for group in self.batches([segments[i] for i in rest]):
                yield self._prepared_batch(segments, [rest[i] for i in group])

        pooled = self._run(produce())
        return segments, pooled

    def warm_up(self) -> None:
        """Run a few batch shapes once, so that a compiled module (`compile: true`) has compiled before the first
        real call; a compiler that cannot run is a ConfigError here, not a failed request later."""
        texts = ["warm up", " ".join(["warm"] * (self.content_budget // 2))]
        try:
            # Batches of several rows: a compiled module runs those (one row runs eagerly, see `pooled`).
            for batch in (texts * 2, texts * 3):  # every policy's path (encode_document_windows)
                self.encode_document_windows(batch)
        except Exception as exc:
            if not self.config.compile:
                raise
            raise ConfigError(f"compile: true, but torch.compile failed on this machine ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); set compile: false") from exc

    def finish(self, pooled: torch.Tensor, dimensions: int | None = None, normalize: bool | None = None) -> np.ndarray:
        """(N, H) pooled -> (N, D) float32 embeddings: Matryoshka truncation and normalisation as configured
        (or as overridden per call)."""
        dims = self.config.dimensions if dimensions is None else dimensions
        norm = self.config.normalize if normalize is None else normalize
        out = finish(pooled, dims, norm).numpy().astype(np.float32, copy=False)
        if self.multivector:
            return out.reshape(-1, self.config.mask_tokens, out.shape[-1])  # (N*K, D) -> (N, K, D)
        return out

    def document_vectors(self, segments: Sequence[Segment], pooled: torch.Tensor, n_texts: int) -> torch.Tensor:
        """(R, H) pooled rows (`embed_segments`) -> (N, H) one vector per document, under the policy ((N*K, H)
        for a multivector: each document's K rows in turn).

        `first` has one window per document; `mean` averages a document's windows weighted by the tokens each
        pooled; `best` / `late_chunk` have no single vector for a document of several windows or chunks
        (ValueError naming it).
        """
        k = self.config.mask_tokens if self.multivector else 1
        sources = [s.source for s in segments for _ in range(s.n_vectors // k)]  # one per vector (per K vectors)
        counts = np.bincount(sources, minlength=n_texts)
        if len(sources) == n_texts and (counts == 1).all():
            out = torch.empty_like(pooled).view(n_texts, k, -1)  # (N, K, H)
            out[torch.tensor(sources)] = pooled.view(n_texts, k, -1)
            return out.view(n_texts * k, -1)
        if not self.config.documents.one_vector:
            i = int(np.flatnonzero(counts > 1)[0])
            raise ValueError(f"documents[{i}] spans {counts[i]} windows and the document policy scores them "
                             f"separately (documents.windows: {self.config.documents.windows}); embed its windows "
                             "with encode_document_windows")
        weights = torch.tensor([float(sum(s.pool_mask)) for s in segments])  # (S,)
        index = torch.tensor([s.source for s in segments])  # (S,)
        total = torch.zeros((n_texts, pooled.shape[1])).index_add_(0, index, pooled * weights[:, None])
        norm = torch.zeros(n_texts).index_add_(0, index, weights)
        return total / norm[:, None]

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
        return self.finish(self.embed_segments(segments))

    def encode_documents(self, texts: Sequence[str], titles: Sequence[str | None] | None = None) -> np.ndarray:
        """(N, D) float32, input order: one vector per document under the document policy (`first` / `mean`;
        under `best` a document of several windows is an error — see `encode_document_windows`)."""
        segments, pooled = self._embed_documents(texts, titles, spans=False)
        if not segments:
            return self._empty()
        return self.finish(self.document_vectors(segments, pooled, len(texts)))

    def encode_document_windows(self, texts: Sequence[str], titles: Sequence[str | None] | None = None
                                ) -> ChunkEmbeddings:
        """What the index stores for each document under the policy: one row per document (`first`, `mean`)
        or one row per window (`best`), grouped by document in input order, with token and character spans.

        A `mean` document's row spans all of its windows; under `late_chunk` each row is a chunk (its spans the
        chunk's). A multivector's rows are (K, D) each.
        """
        segments, pooled = self._embed_documents(texts, titles, spans=True)
        if not segments:
            return ChunkEmbeddings(self._empty(), *(np.zeros(0, np.int64) for _ in range(2)),
                                   np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64))
        if self.config.documents.one_vector and len(segments) != len(texts):
            pooled = self.document_vectors(segments, pooled, len(texts))
            first: dict[int, Segment] = {}
            last: dict[int, Segment] = {}
            for seg in segments:
                first.setdefault(seg.source, seg)
                last[seg.source] = seg
            segments = [
                Segment([], [], i, (first[i].token_span[0], last[i].token_span[1]),
                        (first[i].char_span[0], last[i].char_span[1]), first[i].text_tokens)
                for i in range(len(texts))
            ]
        if any(s.groups is not None for s in segments) and not self.multivector:  # late chunks: a row per chunk
            segments = [
                Segment([], [], seg.source, span, chars, seg.text_tokens)
                for seg in segments
                for span, chars in zip(seg.group_spans or [seg.token_span],
                                       seg.group_chars or [seg.char_span] * seg.n_vectors)
            ]
        chunk_index, seen = [], {}
        for seg in segments:
            chunk_index.append(seen.get(seg.source, 0))
            seen[seg.source] = chunk_index[-1] + 1
        return ChunkEmbeddings(
            vectors=self.finish(pooled),
            text_index=np.array([s.source for s in segments], dtype=np.int64),
            chunk_index=np.array(chunk_index, dtype=np.int64),
            token_spans=np.array([s.token_span for s in segments], dtype=np.int64).reshape(-1, 2),
            char_spans=np.array([s.char_span for s in segments], dtype=np.int64).reshape(-1, 2),
        )
