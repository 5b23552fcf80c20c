"""The two training backends behind one small interface, and the LR schedule they share.

A backend owns the optimizer, the LR schedule, gradient clipping and precision, and saves/loads the trainable state:
DeepSpeed (`deepspeed.enabled`, the default; `diffembed.train.deepspeed.DeepSpeedBackend`) or plain PyTorch DDP
(`TorchBackend`). The worker loop only calls `autocast / accumulate / backward / step / save / load`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from diffembed.train import checkpoints
from diffembed.train.config import TrainConfig


def use_training_attention(device) -> None:
    """SDPA kernels for training on CUDA: cuDNN attention switched off for this process. Its backward builds an
    execution plan per new shape on the host (~250 ms each, measured on an H100 with torch 2.11) and training
    batches change shape every step; the memory-efficient and flash kernels need none. Process-wide on purpose: the
    gradient-checkpointing recompute runs in the backward, and must pick the same kernel as the forward did."""
    if device.type == "cuda":
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)


def make_scheduler(cfg: TrainConfig, optimizer):
    """The LR schedule both backends step once per optimizer step: warmup, then linear / cosine / constant."""
    from transformers import get_scheduler

    return get_scheduler(
        cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.optim.max_steps,
    )


class TorchBackend:
    """Plain PyTorch (`deepspeed.enabled: false`): DistributedDataParallel on the process group Ray Train set
    up (gloo on CPU, nccl on GPU), torch AdamW, the same LR schedule, gradient clipping, bf16 autocast when
    `deepspeed.bf16` resolves on. Checkpoints follow Ray Train's torch pattern: rank 0 writes the trainable
    weights and the optimizer/scheduler state (`diffembed.train.checkpoints.save_torch`), the other ranks report
    metrics only. DeepSpeed is never imported."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, model, device, world: int) -> None:
        import torch

        self.cfg, self.module, self.device = cfg, model, device
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):  # our pooling reads hidden states: BERT's pooler never gets a
            pooler.requires_grad_(False)  # gradient, and DDP refuses parameters that produce no loss
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Buffers (rotary tables) are constants: no broadcast before every forward.
            self.ddp = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.model = self.ddp or model  # what the Embedder's forward runs through
        self.bf16 = cfg.run.use_gpu if cfg.deepspeed.bf16 is None else cfg.deepspeed.bf16

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def accumulate(self, last: bool):
        """Around one GradCache chunk's forward and backward: gradients are all-reduced after the last only."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def backward(self, loss, boundary: bool | None = None) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def save(self, directory: str, client_state: dict[str, Any], rank: int) -> bool:
        """Rank 0 writes the checkpoint (DDP keeps every rank's weights and optimizer state identical);
        returns whether this rank reports the directory."""
        if rank != 0:
            return False
        checkpoints.save_torch(directory, self.module, self.optimizer, self.scheduler, client_state)
        return True

    def load(self, directory: str) -> dict[str, Any]:
        return checkpoints.load_torch(directory, self.module, self.optimizer, self.scheduler, self.device)


def make_backend(cfg: TrainConfig, model, device, world: int):
    """DeepSpeed (`deepspeed.enabled`, the default) or plain PyTorch DDP."""
    if cfg.deepspeed.enabled:
        from diffembed.train.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model)
    return TorchBackend(cfg, model, device, world)
