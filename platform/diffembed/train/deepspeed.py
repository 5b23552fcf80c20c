"""DeepSpeed JSON generated from the TrainConfig: the config object stays the single source of truth."""

from __future__ import annotations

from typing import Any

from diffembed.train.config import TrainConfig


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
