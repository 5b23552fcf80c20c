"""The training job's one config model: embedder, data, LoRA, loss, optimisation, DeepSpeed, Ray run.

The DeepSpeed JSON is generated from this object (`diffembed.train.deepspeed.deepspeed_config`), so batch
sizes, precision and ZeRO settings have one source of truth. `deepspeed.enabled: false` trains with plain
PyTorch DDP instead (same optimizer, schedule, clipping and loss; no ZeRO, no offload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from diffembed.config import ConfigModel, CustomResources, EmbedderConfig, ray_bundle

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DataConfig(ConfigModel):
    train_files: list[str] = Field(description="JSONL or Parquet files/globs of {query, positive, negatives, ...}")
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    hard_negatives: int = Field(1, ge=0, description="Hard negatives per query (the paper uses 1).")
    bad_rows: Literal["skip", "fail"] = Field("skip", description="Rows with missing fields or empty text.")
    same_source_batches: bool = Field(False, description="Draw every global batch from a single `source`.")
    shuffle_seed: int = 0


class LoraConfig(ConfigModel):
    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


class LossConfig(ConfigModel):
    scale: float = Field(50.0, gt=0, description="Cosine similarity multiplier (1/temperature; 50 = tau 0.02).")
    gather_across_workers: bool = True
    grad_cache_chunk_size: int | None = Field(
        None, ge=1, description="Embed in chunks of this many texts with GradCache; None = one pass."
    )
    matryoshka_dims: list[int] | None = Field(
        None, description="Matryoshka (MRL): InfoNCE summed over these prefix sizes of the embedding, e.g. "
        "[64, 128, 256], each prefix re-normalised; the full width is always added (weight 1) when not listed. "
        "None: plain InfoNCE on the full vector.",
    )
    matryoshka_weights: list[float] | None = Field(
        None, description="One weight per matryoshka_dims entry (default: all 1)."
    )

    @model_validator(mode="after")
    def _check_matryoshka(self) -> Self:
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is None:
            if weights is not None:
                raise ValueError("loss.matryoshka_weights needs loss.matryoshka_dims")
            return self
        if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"loss.matryoshka_dims must be distinct sizes >= 1; got {dims}")
        if weights is not None and (len(weights) != len(dims) or any(w <= 0 for w in weights)):
            raise ValueError(f"loss.matryoshka_weights must be {len(dims)} positive numbers, one per "
                             f"matryoshka_dims entry; got {weights}")
        return self

    def matryoshka(self, width: int) -> list[tuple[int, float]] | None:
        """(prefix size, weight) pairs for an embedding of `width` dimensions (the model's output: its hidden size,
        or `embedder.dimensions`), ascending, the full width included; None without Matryoshka.
        ConfigError when a size exceeds the width."""
        from diffembed.config import ConfigError

        if self.matryoshka_dims is None:
            return None
        too_wide = [d for d in self.matryoshka_dims if d > width]
        if too_wide:
            raise ConfigError(f"loss.matryoshka_dims {too_wide} exceed the embedding width {width} (the model's "
                              "hidden size, or embedder.dimensions when set)")
        pairs = dict(zip(self.matryoshka_dims, self.matryoshka_weights or [1.0] * len(self.matryoshka_dims)))
        pairs.setdefault(width, 1.0)
        return sorted(pairs.items())


class OptimConfig(ConfigModel):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_steps: int = Field(1000, ge=1)
    global_batch_size: int = Field(16, ge=1, description="Queries per optimizer step across all workers.")
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False


# zero_optimization keys the typed fields below generate: zero_options may not set them a second way.
OWNED_ZERO_KEYS = {
    "stage": "deepspeed.zero_stage",
    "offload_optimizer": "deepspeed.offload_optimizer",
    "offload_param": "deepspeed.offload_params",
}


class DeepSpeedConfig(ConfigModel):
    enabled: bool = Field(
        True,
        description="False: plain PyTorch DDP through Ray Train (torch AdamW, same schedule and clipping); "
        "zero_stage is then unused and offloading is an error.",
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool | None = Field(
        None, description="Default: on when training on GPUs, off on CPU. Without DeepSpeed: bf16 autocast."
    )
    zero_options: dict[str, Any] = Field(
        default_factory=dict,
        description="More keys for DeepSpeed's zero_optimization section, e.g. stage3_max_live_parameters, "
        "stage3_prefetch_bucket_size, reduce_bucket_size; checked against DeepSpeed's schema before the run starts. "
        "Not stage or offloading (the fields above).",
    )


class RunConfig(ConfigModel):
    name: str = "diffembed-train"
    storage_path: str = Field("runs", description="Local dir or URI (s3://, gs://) for Ray Train results.")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: CustomResources = Field(
        default_factory=dict,
        description="Extra Ray resources per worker, e.g. {train_node: 1} to run on cluster.yaml's training pool.",
    )
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    log_every: int = Field(
        10, ge=1,
        description="Report metrics to Ray Train every N steps (checkpoint steps always report). Every step is in "
        "the run's history either way (checkpoints, train_history.json).",
    )
    report_poll_s: float = Field(
        0.25, gt=0, le=60,
        description="How often Ray Train's controller collects the workers' reports (it sets "
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the run). A report waits until the controller has taken the previous "
        "one, so steps faster than this wait for it; Ray's default of 2 s capped a small model at 0.5 steps/s.",
    )
    seed: int = 0
    export_dir: str | None = Field(None, description="Default: <storage_path>/<name>/export")
    fail_at_step: int | None = Field(None, description="Testing: rank 0 raises at this step on the first attempt.")


class EvalConfig(ConfigModel):
    dev_files: list[str] = Field(
        default_factory=list,
        description="Dev rows (same schema): nDCG@10 of the base model before and of the export after training.",
    )
    every: int = Field(0, ge=0, description="Also evaluate the model in training every N steps (0 = off).")


class TrainConfig(ConfigModel):
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.optim.global_batch_size % self.run.num_workers:
            raise ValueError(
                f"optim.global_batch_size={self.optim.global_batch_size} is not divisible by "
                f"run.num_workers={self.run.num_workers}"
            )
        if self.deepspeed.offload_params and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        if not self.deepspeed.enabled and (self.deepspeed.offload_optimizer or self.deepspeed.offload_params):
            raise ValueError("deepspeed.offload_optimizer / offload_params need deepspeed.enabled")
        if not self.deepspeed.enabled and self.deepspeed.zero_options:
            raise ValueError("deepspeed.zero_options need deepspeed.enabled")
        owned = sorted(OWNED_ZERO_KEYS.keys() & self.deepspeed.zero_options.keys())
        if owned:
            raise ValueError(f"deepspeed.zero_options: set {', '.join(OWNED_ZERO_KEYS[k] for k in owned)} instead of "
                             f"{', '.join(owned)}")
        return self

    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker requests (one placement-group bundle per worker): CPUs, 1 GPU, custom."""
        return ray_bundle(self.run.cpus_per_worker, 1 if self.run.use_gpu else 0, self.run.resources_per_worker)

    @property
    def per_worker_batch_size(self) -> int:
        return self.optim.global_batch_size // self.run.num_workers

    def check_files(self) -> None:
        """Fail before Ray starts when an input file is missing, or (read from the model's config.json, no weights
        loaded) when the Matryoshka sizes exceed the embedding width."""
        from diffembed.files import expand_files

        expand_files(self.data.train_files, "data.train_files")
        if self.eval.dev_files:
            expand_files(self.eval.dev_files, "eval.dev_files")
        if self.loss.matryoshka_dims is not None:
            from diffembed.batch.pipeline import model_dimension

            self.loss.matryoshka(model_dimension(self.embedder))

    @property
    def run_uri(self) -> str:
        """`<storage_path>/<name>`: an absolute local path, or a URI (`file:///…`, `s3://…`) kept as a URI."""
        from diffembed.train import storage

        return storage.join(storage.normalize(self.run.storage_path), self.run.name)

    @property
    def export_uri(self) -> str:
        from diffembed.train import storage

        return storage.normalize(self.run.export_dir) if self.run.export_dir else storage.join(self.run_uri, "export")

    @property
    def run_dir(self) -> Path:
        """The run directory on this machine (a local `storage_path` or a `file://` one); use `run_uri` for any."""
        return _local(self.run_uri, "run.storage_path")

    @property
    def export_path(self) -> Path:
        return _local(self.export_uri, "run.export_dir")


def _local(location: str, what: str) -> Path:
    from diffembed.config import ConfigError
    from diffembed.train import storage

    path = storage.local_path(location)
    if path is None:
        raise ConfigError(f"{what}: {location} is not on a local filesystem")
    return path
