"""The serving application's one typed config: embedder, optional store, deployment sizing, request limits."""

from __future__ import annotations

import os
from typing import Any, Self

from pydantic import Field, model_validator

from diffembed.config import ConfigModel, CustomResources, EmbedderConfig, ray_options
from diffembed.index.config import StoreConfig


class AutoscalingArgs(ConfigModel):
    """Serve's request-based autoscaler for the encoder (a subset of ray.serve.config.AutoscalingConfig)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Queued + running requests per replica to aim at.")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class EncoderArgs(ConfigModel):
    """The encoder deployment: how requests are batched and how many replicas run it, on what."""

    max_batch_tokens: int | None = Field(
        None, ge=64, description="@serve.batch max size, in tokens (segment lengths summed over the batch). "
        "Default: the embedder's max_batch_tokens, so a Serve batch is one forward pass.",
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill up.")
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count; ignored when autoscaling is set.")
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    resources: CustomResources = Field(
        default_factory=dict,
        description="Extra Ray resources per replica, e.g. {inference_node: 1} for cluster.yaml's inference pool.",
    )
    torch_threads: int | None = Field(None, ge=1, description="Intra-op threads per replica. Default: max(1, num_cpus).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica takes at once (its batch source).")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests waiting for a replica beyond that; more are refused (HTTP 429 + Retry-After) "
        "instead of waiting without bound.",
    )

    def ray_actor_options(self) -> dict[str, Any]:
        """The resources every encoder replica is started with (Serve's `ray_actor_options`)."""
        return ray_options(self.num_cpus, self.num_gpus, self.resources)


class LimitsArgs(ConfigModel):
    max_inputs_per_request: int = Field(256, ge=1)
    max_chars_per_input: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(4_000_000, ge=1)
    truncate_default: bool = Field(True, description="Inputs over max_length are truncated unless a request says not.")
    max_top_k: int = Field(100, ge=1)


class ServeArgs(ConfigModel):
    """Arguments of `serve/app.py:app_builder` (the `args:` of a Serve config file)."""

    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    store: StoreConfig | None = Field(None, description="None: no /search route (embeddings only).")
    encoder: EncoderArgs = Field(default_factory=EncoderArgs)
    retriever_replicas: int = Field(1, ge=1, description="Forced to 1 for the embedded Edge store (one process per path).")
    retriever_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_max_ongoing_requests: int = Field(512, ge=1)
    ingress_max_queued_requests: int = Field(1024, ge=1, description="Beyond this Serve's proxy answers 429 itself.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with a 429.")
    request_timeout_s: float = Field(
        60.0, gt=0, description="A request's deadline: calls to a lost replica are retried on another within it.",
    )
    limits: LimitsArgs = Field(default_factory=LimitsArgs)
    api_key: str | None = Field(None, repr=False, description="Bearer key for every route but /healthz; env DIFFEMBED_API_KEY.")
    model_name: str | None = Field(None, description="Model id shown by /v1/models. Default: embedder.model.")

    @model_validator(mode="after")
    def _fill(self) -> Self:
        if self.api_key is None and os.environ.get("DIFFEMBED_API_KEY"):
            object.__setattr__(self, "api_key", os.environ["DIFFEMBED_API_KEY"])
        if self.model_name is None:
            object.__setattr__(self, "model_name", self.embedder.model)
        return self
