"""The encoder deployment: one Embedder per replica, requests micro-batched by tokens with @serve.batch.

Each input text becomes one batch item carrying its ready-made segments (tokenised in the caller's request,
outside the batch loop) and its token cost; `batch_size_fn` sums those costs, so a batch is bounded by
padded-token budget rather than by request count. The forward pass runs in a worker thread so the replica's
event loop keeps accepting requests (and health checks) while a batch computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from ray import serve

from diffembed.config import EmbedderConfig
from diffembed.serving.errors import InvalidInput

log = logging.getLogger("ray.serve")

Kind = Literal["query", "document"]


class InputTooLong(InvalidInput):
    """An input does not fit one window (or the policy's windows, or is several late-chunked chunks) and the
    request asked not to truncate."""

    code = "input_too_long"


class InvalidTokenIds(InvalidInput):
    """A token-id input holds an id outside the model's vocabulary (or is empty)."""

    code = "invalid_token_ids"


@dataclass
class Item:
    segments: list  # list[Segment], all with source 0
    cost: int  # tokens counted against the batch budget (capped at the budget itself)
    queued_at: float = 0.0  # time.monotonic() when the item joined the batch queue


class EncoderMetrics:
    """Queue depth, batch size (texts and tokens) and batch wait of one encoder replica, as Ray metrics
    (`ray_diffembed_encoder_*` on Prometheus) and as a snapshot the replica answers with (`stats`)."""

    WAIT_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    TEXTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    TOKENS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]

    def __init__(self) -> None:
        from ray.serve.metrics import Gauge, Histogram

        self.queue = Gauge("diffembed_encoder_queue_depth",
                           description="Inputs waiting for or in a forward pass on this replica.")
        self.texts = Histogram("diffembed_encoder_batch_texts", description="Inputs per forward batch.",
                               boundaries=self.TEXTS)
        self.tokens = Histogram("diffembed_encoder_batch_tokens", description="Tokens per forward batch.",
                                boundaries=self.TOKENS)
        self.wait = Histogram("diffembed_encoder_batch_wait_ms",
                              description="How long an input waited in the queue before its batch ran (ms).",
                              boundaries=self.WAIT_MS)
        self.depth = 0
        self.batches = self.batch_texts = self.batch_tokens = 0
        self.max_wait_ms = 0.0

    def enqueued(self, n: int) -> None:
        self.depth += n
        self.queue.set(self.depth)

    def dequeued(self, n: int) -> None:
        self.depth -= n
        self.queue.set(self.depth)

    def batch(self, items: list[Item], started: float) -> None:
        tokens = batch_tokens(items)
        self.texts.observe(len(items))
        self.tokens.observe(tokens)
        for item in items:
            wait_ms = (started - item.queued_at) * 1000
            self.wait.observe(wait_ms)
            self.max_wait_ms = max(self.max_wait_ms, wait_ms)
        self.batches += 1
        self.batch_texts += len(items)
        self.batch_tokens += tokens

    def snapshot(self) -> dict[str, float]:
        return {"queue_depth": self.depth, "batches": self.batches, "batch_texts": self.batch_texts,
                "batch_tokens": self.batch_tokens, "max_wait_ms": self.max_wait_ms}


def batch_tokens(items: list[Item]) -> int:
    return sum(item.cost for item in items)


@dataclass
class EncodeResult:
    vectors: np.ndarray  # (N, D) float32; (N, K, D) for a multivector model (mask_vectors: multi)
    tokens: list[int]  # tokens per input (after truncation, incl. special tokens)


class _TokenBudgetWarningFilter(logging.Filter):
    """Serve warns when max_batch_size > max_ongoing_requests, which assumes one item per request. Our
    batch size is in tokens and one request brings many texts, so the warning does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will never achieve the configured `max_batch_size`" not in record.getMessage()


class EncoderImpl:
    """The deployment's body, usable without Serve (tests and the in-process benchmark baseline)."""

    def __init__(self, embedder: dict[str, Any], max_batch_tokens: int | None = None,
                 batch_wait_timeout_s: float = 0.005, torch_threads: int | None = None):
        import torch

        from diffembed.models.embedder import Embedder

        log.addFilter(_TokenBudgetWarningFilter())
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.embedder_config = EmbedderConfig.model_validate(embedder)  # as given (the batch job fingerprints it)
        self.embedder = Embedder(self.embedder_config)
        self._fingerprints: dict[tuple[str, bool], dict[str, Any]] = {}
        if self.embedder.config.compile:  # compiled kernels are built before the replica takes requests
            self.embedder.warm_up()
        # One token budget: a Serve batch holds what the Embedder runs in one forward pass, unless retuned.
        self.max_batch_tokens = max_batch_tokens or self.embedder.config.max_batch_tokens
        self._retune(self.max_batch_tokens, batch_wait_timeout_s)
        self._metrics: EncoderMetrics | None = None  # made on the first Serve request (needs a replica context)

    # -- configuration --------------------------------------------------------------------------------

    def _retune(self, max_batch_tokens: int, batch_wait_timeout_s: float) -> None:
        self.max_batch_tokens = int(max_batch_tokens)
        self._run.set_max_batch_size(self.max_batch_tokens)
        self._run.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this on `user_config` changes: retune batching without a redeploy."""
        user_config = user_config or {}
        self._retune(
            user_config.get("max_batch_tokens") or self.max_batch_tokens,
            user_config.get("batch_wait_timeout_s", self._run._get_batch_wait_timeout_s()),
        )
        log.info("encoder retuned: max_batch_tokens=%s batch_wait_timeout_s=%s", self.max_batch_tokens,
                 self._run._get_batch_wait_timeout_s())

    def batch_settings(self) -> dict[str, float]:
        return {"max_batch_tokens": self._run._get_max_batch_size(),
                "batch_wait_timeout_s": self._run._get_batch_wait_timeout_s()}

    # -- info -----------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        cfg = self.embedder.config
        return {"model": cfg.model, "dimension": self.embedder.dimension, "hidden_size": self.embedder.hidden_size,
                "max_length": cfg.max_length, "normalize": cfg.normalize,
                "vectors_per_input": cfg.mask_tokens if self.embedder.multivector else 1,
                "documents": cfg.documents.model_dump(mode="json"), "vocab_size": len(self.embedder.tokenizer),
                "query_instruction": cfg.query_instruction}

    async def fingerprint(self, distance: str, sparse: bool) -> dict[str, Any]:
        """The embedding fingerprint (`diffembed.index.fingerprint`) the batch job stores with a collection it fills
        with this model and config (`distance` vectors, BM25 vectors when `sparse`). Computed once per (distance,
        sparse) from the checkpoint's files, config and tokenizer: the weights are not loaded again."""
        from diffembed.index.fingerprint import embedding_fingerprint

        key = (distance, bool(sparse))
        if key not in self._fingerprints:
            self._fingerprints[key] = await asyncio.to_thread(
                embedding_fingerprint, self.embedder_config, self.embedder.dimension, distance, bool(sparse))
        return self._fingerprints[key]

    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, float]:
        """This replica's queue depth and batch totals so far (the same figures its Ray metrics export)."""
        if self._metrics is None:  # no request yet
            return {"queue_depth": 0, "batches": 0, "batch_texts": 0, "batch_tokens": 0, "max_wait_ms": 0.0}
        return self._metrics.snapshot()

    # -- encoding -------------------------------------------------------------------------------------

    def _segments(self, inputs: list[str] | list[list[int]], kind: Kind, instruction: str | None,
                  truncate: bool) -> list[list]:
        """Each input's segments (source 0), built by the Embedder under its query format / document policy.

        An input is a text or a list of the model's token ids (content only: the Embedder adds special tokens,
        the instruction and windows exactly as for text); ids outside the vocabulary are `InvalidInput`.

        Without `truncate`, an input that does not fit is an error rather than silently cut: a query or a
        `first`-policy document longer than max_length, or a `best`-policy document of several windows or a
        `late_chunk` one of several chunks (it has no single vector; with `truncate` it gets the index's point 0:
        its first window's vector, or its first chunk's, pooled from the same forward pass over its first
        (macro-)window as the batch job's).
        """
        from diffembed.models.embedder import TokenIdError  # torch stays out of the ingress, which imports this

        emb = self.embedder
        policy = emb.config.documents.windows
        # only `best` needs truncating to one window; `mean` averages them all, `first` cuts anyway; `late_chunk`
        # keeps its windows (chunk 0 is pooled from the whole first window's forward pass) and is trimmed below
        windows = "first" if truncate and policy == "best" else None
        if inputs and not isinstance(inputs[0], str):
            try:
                segs = (emb.query_segments_from_ids(inputs, instruction, what="input") if kind == "query"
                        else emb.document_segments_from_ids(inputs, windows=windows, what="input"))
            except TokenIdError as exc:
                raise InvalidTokenIds(str(exc)) from None
        elif kind == "query":
            segs = emb.query_segments(inputs, instruction)
        else:
            segs = emb.document_segments(inputs, windows=windows, spans=False)
        per_text: list[list] = [[] for _ in inputs]
        for seg in segs:
            per_text[seg.source].append(dataclasses.replace(seg, source=0))
        if kind == "document" and policy == "late_chunk":
            for i, segments in enumerate(per_text):
                chunks = sum(len(s.groups) if s.groups is not None else 1 for s in segments)
                if chunks > 1 and not truncate:
                    raise InputTooLong(
                        f"input[{i}] is {chunks} chunks and the document policy scores chunks separately "
                        "(documents.windows: late_chunk); send truncate=true for its first chunk"
                    )
                if chunks > 1:  # the first window as it is (the same forward pass), pooled for chunk 0 only
                    first = segments[0]
                    per_text[i] = [dataclasses.replace(first, groups=first.groups[:1], group_spans=(
                        first.group_spans[:1] if first.group_spans is not None else None), group_chars=(
                        first.group_chars[:1] if first.group_chars is not None else None))]
        if not truncate:
            for i, segments in enumerate(per_text):
                if kind == "document" and policy == "best" and len(segments) > 1:
                    raise InputTooLong(
                        f"input[{i}] spans {len(segments)} windows and the document policy scores windows "
                        "separately (documents.windows: best); send truncate=true for its first window"
                    )
                if (kind == "query" or policy == "first") and segments[0].token_span[1] < segments[0].text_tokens:
                    content = segments[0].text_tokens
                    if kind == "document" and isinstance(inputs[i], str):  # a `first` window tokenized a prefix of
                        # a long text only (`Embedder.first_tokens`): count the whole text for the message
                        content = len(emb.tokenize([emb.config.documents.join(inputs[i], None)], offsets=False)[0][0])
                    total = content + len(segments[0].ids) - (segments[0].token_span[1] - segments[0].token_span[0])
                    raise InputTooLong(
                        f"input[{i}] has {total} tokens, more than max_length={emb.config.max_length}; "
                        "shorten it or send truncate=true"
                    )
        return per_text

    def _compute(self, items: list[Item]) -> np.ndarray:
        """(len(items), H) pooled, un-normalised vectors: one per item under the document policy; (len(items), K,
        H) for a multivector model."""
        emb = self.embedder
        segments = [dataclasses.replace(s, source=i) for i, item in enumerate(items) for s in item.segments]
        pooled = emb.document_vectors(segments, emb.embed_segments(segments), len(items)).numpy()  # (N[*K], H)
        if emb.multivector:
            return pooled.reshape(len(items), emb.config.mask_tokens, -1)  # (N*K, H) -> (N, K, H)
        return pooled

    @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, max_concurrent_batches=1, batch_size_fn=batch_tokens)
    async def _run(self, items: list[Item]) -> list[np.ndarray]:
        if self._metrics is not None:
            self._metrics.batch(items, time.monotonic())
        pooled = await asyncio.to_thread(self._compute, items)
        return list(pooled)

    async def embed(self, inputs: list[str] | list[list[int]], kind: Kind = "document", instruction: str | None = None,
                    truncate: bool = True, dimensions: int | None = None,
                    normalize: bool | None = None) -> EncodeResult:
        """Vectors for `inputs` (texts, or token-id lists) as `Embedder.encode_documents`/`encode_queries` gives
        them, micro-batched with other requests by @serve.batch.

        `dimensions` (Matryoshka) keeps the first N of the model's dimensions; `normalize` overrides the config.
        Tokenisation runs in a worker thread: the replica's event loop keeps taking requests meanwhile.
        """
        if self._metrics is None:
            self._metrics = EncoderMetrics()
        self._metrics.enqueued(len(inputs))
        try:
            items = await asyncio.to_thread(self._items, inputs, kind, instruction, truncate, dimensions)
            queued = time.monotonic()
            for item in items:
                item.queued_at = queued
            pooled = await asyncio.gather(*(self._run(item) for item in items))
        finally:
            self._metrics.dequeued(len(inputs))
        return self._result(items, pooled, dimensions, normalize)

    def embed_unbatched(self, inputs: list[str] | list[list[int]], kind: Kind = "document", instruction: str | None = None,
                        truncate: bool = True, dimensions: int | None = None,
                        normalize: bool | None = None) -> EncodeResult:
        """`embed` without Serve's micro-batching (the same segments, vectors and finishing): for tests and the
        in-process benchmark baseline, where no replica context exists."""
        items = self._items(inputs, kind, instruction, truncate, dimensions)
        return self._result(items, list(self._compute(items)) if items else [], dimensions, normalize)

    def _items(self, inputs: list[str] | list[list[int]], kind: Kind, instruction: str | None, truncate: bool,
               dimensions: int | None) -> list[Item]:
        if dimensions is not None and not 1 <= dimensions <= self.embedder.dimension:
            raise ValueError(f"dimensions must be between 1 and {self.embedder.dimension}")
        per_text = self._segments(list(inputs), kind, instruction, truncate)
        return [Item(segs, min(sum(len(s.ids) for s in segs), self.max_batch_tokens)) for segs in per_text]

    def _result(self, items: list[Item], pooled: list[np.ndarray], dimensions: int | None,
                normalize: bool | None) -> EncodeResult:
        import torch

        tokens = [sum(len(s.ids) for s in item.segments) for item in items]
        if not pooled:
            per_input = (self.embedder.config.mask_tokens,) if self.embedder.multivector else ()
            return EncodeResult(np.zeros((0, *per_input, dimensions or self.embedder.dimension), np.float32), tokens)
        vectors = self.embedder.finish(torch.from_numpy(np.stack(pooled)), dimensions, normalize)
        return EncodeResult(vectors, tokens)


def encoder_deployment(args) -> serve.Deployment:
    """The Encoder deployment, sized from `ServeArgs.encoder`. Its queue is bounded: beyond
    `max_queued_requests` waiting calls, a caller's handle raises BackPressureError at once (the ingress answers
    429 with Retry-After) instead of letting latency grow without bound."""
    from ray.serve.config import BackpressureConfig

    enc = args.encoder
    options: dict[str, Any] = {
        "name": "Encoder",
        "ray_actor_options": enc.ray_actor_options(),
        "max_ongoing_requests": enc.max_ongoing_requests,
        "max_queued_requests": enc.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=args.retry_after_s),
        "user_config": {"max_batch_tokens": enc.max_batch_tokens, "batch_wait_timeout_s": enc.batch_wait_timeout_s},
        "health_check_period_s": 10,
    }
    if enc.autoscaling is not None:
        options["autoscaling_config"] = enc.autoscaling.to_serve()
    else:
        options["num_replicas"] = enc.num_replicas or 1
    return serve.deployment(EncoderImpl).options(**options)
