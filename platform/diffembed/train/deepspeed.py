"""DeepSpeed for the training loop: the JSON generated from the TrainConfig (the config object stays the single
source of truth) and the backend that wraps the model in a DeepSpeed engine.

Nothing here imports `deepspeed` at module level: with `deepspeed.enabled: false` the loop trains with plain
PyTorch DDP (`diffembed.train.backends.TorchBackend`) and DeepSpeed is never imported or initialised.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from diffembed.train.config import TrainConfig

CKPT_TAG = "ds"  # DeepSpeed tag inside every Ray checkpoint directory a DeepSpeed run writes


def deepspeed_config(cfg: TrainConfig, use_gpu: bool) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # Gather full weights on save, so a final export never needs the per-rank shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    zero.update(ds.zero_options)
    bf16 = use_gpu if ds.bf16 is None else ds.bf16
    return {
        # One optimizer step = one global batch; GradCache chunks happen inside a micro-batch.
        "train_batch_size": cfg.optim.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.per_worker_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # we pass a torch optimizer (no FusedAdam build)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def check_zero_options(cfg: TrainConfig) -> None:
    """ConfigError (one line) when `deepspeed.zero_options` holds a key or value DeepSpeed's ZeRO schema rejects,
    so a typo fails on the driver before any worker starts, not in every worker on every retry. Imports DeepSpeed
    only when there are options to check."""
    if not (cfg.deepspeed.enabled and cfg.deepspeed.zero_options):
        return
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from diffembed.config import ConfigError, one_line

    try:
        DeepSpeedZeroConfig(**deepspeed_config(cfg, cfg.run.use_gpu)["zero_optimization"])
    except ValidationError as exc:
        raise ConfigError(f"deepspeed.zero_options: {one_line(exc)}") from exc


SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build(deepspeed) -> None:
    """Keep DeepSpeed's communication setup from building its shared-memory all-reduce op.

    On the CPU accelerator, DeepSpeed's torch comm backend JIT-compiles that op with the C++ compiler when it
    starts (40 s on 2 cores, once per torch-extensions cache: every fresh container). Only `inference_all_reduce`
    (tensor-parallel inference) uses the op. Training reduces through torch.distributed (gloo), so skipping the
    build changes no result. DeepSpeed skips an op that its table of compatible ops marks as incompatible, and
    that table is one module-level dict, built on first access, that DeepSpeed keeps.
    """
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


class DeepSpeedBackend:
    """The trainable model in a DeepSpeed engine: ZeRO, clipping, bf16 and the LR schedule step inside
    `engine.step()`; checkpoints are per-rank DeepSpeed shards under tag `CKPT_TAG`."""

    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, model) -> None:
        import deepspeed
        import torch

        from diffembed.train.backends import make_scheduler

        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.deepspeed.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(cfg, optimizer)
        skip_shm_comm_build(deepspeed)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=self.scheduler, config=deepspeed_config(cfg, cfg.run.use_gpu)
        )
        self.model = self.engine  # what the Embedder's forward runs through

    def autocast(self):
        return contextlib.nullcontext()  # the engine casts the model itself when bf16 is on

    def accumulate(self, last: bool):
        return contextlib.nullcontext()  # GradCache boundaries go through `backward(..., boundary=)`

    def backward(self, loss, boundary: bool | None = None) -> None:
        if boundary is None:
            self.engine.backward(loss)
        else:  # one GradCache chunk: reduce gradients only after the step's last chunk
            self.engine.set_gradient_accumulation_boundary(boundary)
            self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, directory: str, client_state: dict[str, Any], rank: int) -> bool:
        """Every rank writes its shard; returns whether this rank reports the directory (all do). Frozen
        parameters (the LoRA base) are left out: a resume or an export reloads them from the base checkpoint."""
        self.engine.save_checkpoint(
            directory, tag=CKPT_TAG, client_state=client_state, exclude_frozen_parameters=True
        )
        return True

    def load(self, directory: str) -> dict[str, Any]:
        if not Path(directory, CKPT_TAG).is_dir():
            raise RuntimeError(f"{directory} holds no DeepSpeed checkpoint (written with deepspeed.enabled: false?)")
        # Not strict: the checkpoint has no frozen weights; the model already holds them from the base.
        _, client = self.engine.load_checkpoint(directory, tag=CKPT_TAG, load_module_strict=False)
        return client


def fp32_state_dict(directory: str, lazy: bool = False) -> dict[str, Any]:
    """The trainable parameters in fp32, gathered from a DeepSpeed checkpoint's ZeRO-2/3 shards (frozen ones are
    never read, even from a checkpoint that holds them). `lazy`: values are DeepSpeed's gathered-tensor handles,
    each materialised by `.contiguous()`, so full fine-tuned weights can be streamed one tensor at a time."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        directory, tag=CKPT_TAG, exclude_frozen_parameters=True, lazy_mode=lazy
    )
