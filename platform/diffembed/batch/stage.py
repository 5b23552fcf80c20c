"""What the Ray Data stages that encode (the batch job's and the mining job's) share: the model loaded once per
actor, and a load that fails on the user's account reported as the user's error."""

from __future__ import annotations

from typing import Any

from diffembed.config import ConfigError, EmbedderConfig


class EncoderStage:
    """Base of a Ray Data actor that loads the Embedder once, with `threads` torch threads (Ray pins an actor to
    OMP_NUM_THREADS=num_cpus, one, otherwise: on CPU the encoder would use one core while the rest of the pipeline
    needs next to none).

    A ConfigError while loading (what this node cannot run: no CUDA, bf16 unsupported, flash-attn missing, no
    checkpoint at this path on this node) is kept and raised by `embedder` on the stage's first batch. Ray
    Data reports an error raised by a batch as the user's, and the job's CLI prints it as one line
    (`diffembed.cli`); an actor whose constructor raises is reported as an internal Ray failure, with some 150 lines
    of traceback and a request to file a Ray issue."""

    def __init__(self, embedder: dict[str, Any], threads: int):
        import torch

        from diffembed.models.embedder import Embedder

        torch.set_num_threads(threads)
        self._embedder: Embedder | None = None
        self._error: ConfigError | None = None
        try:
            self._embedder = Embedder(EmbedderConfig.model_validate(embedder))
        except ConfigError as exc:
            self._error = exc

    @property
    def embedder(self):
        """The loaded Embedder; the load's ConfigError when it failed."""
        if self._error is not None:
            raise self._error
        return self._embedder
