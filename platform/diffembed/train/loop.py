"""The per-worker training loop (runs inside Ray Train's TorchTrainer) and the driver that launches it.

Each worker loads the backbone through the same `Embedder` that batch inference and serving use, wraps it
with peft LoRA (or trains it fully), hands it to a backend — DeepSpeed (`deepspeed.enabled`, the default) or
plain PyTorch DDP (`deepspeed.enabled: false`) — and steps through its slice of the shared global-batch plan.
Checkpoints are reported through `ray.train.report`: per-rank DeepSpeed shards, or rank 0's torch state
dicts; on a restart (worker failure or `--resume`) the loop reloads the latest one and continues at its step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from diffembed.train.config import TrainConfig
from diffembed.train.deepspeed import CKPT_TAG  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)

BERT_LORA_TARGETS = ["query", "key", "value", "dense"]
TORCH_DIR = "torch"  # the torch backend's files inside a Ray checkpoint directory
TORCH_MODEL_FILE = "model.pt"  # trainable parameters by name
TORCH_STATE_FILE = "training_state.pt"  # optimizer, scheduler, step
PROBE_FILE = "probe_embeddings.json"
HISTORY_FILE = "history.json"
PROBE_TEXTS = [
    "diffusion language models read text in both directions",
    "a query about retrieval",
    "The quick brown fox jumps over the lazy dog.",
]


def lora_targets(cfg: TrainConfig, family: str) -> list[str]:
    from diffembed.train.config import LORA_TARGETS

    if family == "bert" and cfg.lora.target_modules == LORA_TARGETS:
        return BERT_LORA_TARGETS  # BERT names its projections differently
    return cfg.lora.target_modules


def build_trainable(embedder, cfg: TrainConfig):
    """The backbone as it is trained: LoRA-wrapped (peft) or full, gradient checkpointing if asked."""
    model = embedder.model
    if cfg.optim.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=lora_targets(cfg, embedder.config.family),
            bias="none",
        )
        model = get_peft_model(model, lora)
        if cfg.optim.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def _step_rows(plan: list[list[dict]], step: int, rank: int, per_worker: int) -> list[dict]:
    return plan[step][rank * per_worker : (rank + 1) * per_worker]


def make_scheduler(cfg: TrainConfig, optimizer):
    """The LR schedule both backends step once per optimizer step: warmup, then linear / cosine / constant."""
    from transformers import get_scheduler

    return get_scheduler(
        cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.optim.max_steps,
    )


def trainable_state(model) -> dict[str, Any]:
    """The parameters training changes (the LoRA adapter, or every weight in full fine-tuning), by name."""
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


class TorchBackend:
    """Plain PyTorch (`deepspeed.enabled: false`): DistributedDataParallel on the process group Ray Train set
    up (gloo on CPU, nccl on GPU), torch AdamW, the same LR schedule, gradient clipping, bf16 autocast when
    `deepspeed.bf16` resolves on. Checkpoints follow Ray Train's torch pattern: rank 0 writes the trainable
    weights (`torch/model.pt`) and the optimizer/scheduler state (`torch/training_state.pt`), the other
    ranks report metrics only. DeepSpeed is never imported."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig, model, device, world: int) -> None:
        import torch

        self.cfg, self.module, self.device = cfg, model, device
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
        import torch

        folder = Path(directory, TORCH_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(self.module), folder / TORCH_MODEL_FILE)
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "client": client_state},
            folder / TORCH_STATE_FILE,
        )
        return True

    def load(self, directory: str) -> dict[str, Any]:
        import torch

        folder = Path(directory, TORCH_DIR)
        if not (folder / TORCH_MODEL_FILE).is_file():
            raise RuntimeError(f"{directory} holds no torch checkpoint (written with deepspeed.enabled: true?)")
        state = torch.load(folder / TORCH_MODEL_FILE, map_location=self.device, weights_only=True)
        _check_fits(self.module, self.module.load_state_dict(state, strict=False))
        saved = torch.load(folder / TORCH_STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        return saved["client"]


def _check_fits(model, result) -> None:
    missing, unexpected = result
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(f"checkpoint does not fit the model: missing {sorted(trainable & set(missing))[:4]}, "
                           f"unexpected {sorted(unexpected)[:4]}")


def make_backend(cfg: TrainConfig, model, device, world: int):
    """DeepSpeed (`deepspeed.enabled`, the default) or plain PyTorch DDP."""
    if cfg.deepspeed.enabled:
        from diffembed.train.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model)
    return TorchBackend(cfg, model, device, world)


def checkpoint_state_dict(directory: str) -> dict[str, Any]:
    """The trained weights in a checkpoint directory, whichever backend wrote it: the torch backend's
    trainable parameters as saved, or the full fp32 weights rebuilt from DeepSpeed's ZeRO shards."""
    path = Path(directory, TORCH_DIR, TORCH_MODEL_FILE)
    if path.is_file():
        import torch

        return {name: t.float() for name, t in torch.load(path, map_location="cpu", weights_only=True).items()}
    from diffembed.train.deepspeed import fp32_state_dict

    return fp32_state_dict(directory)


def train_step(embedder, engine, q_segs, p_segs, n_segs, loss_fn, chunk: int | None):
    """One optimizer step on this rank's share of the global batch; returns the (local) loss.

    Without `chunk`: one forward per group, one backward. With it, GradCache: every chunk is embedded twice
    (see `grad_cache_step`); each chunk's second forward and its backward run under the backend's
    `accumulate` context, so DDP all-reduces gradients once, after the step's last chunk (DeepSpeed is told
    the same through its gradient-accumulation boundary)."""
    import torch

    from diffembed.train.losses import grad_cache_step

    def embed(segs):
        with engine.autocast():
            return embedder.forward(embedder.collate(segs))  # (b, D)

    if chunk:
        total = sum(math.ceil(len(g) / chunk) for g in (q_segs, p_segs, n_segs))
        backwards = [0]
        pending = contextlib.ExitStack()  # DDP's no_sync spans a chunk's forward and its backward

        def embed_chunk(segs):
            if torch.is_grad_enabled():  # GradCache's second pass: this chunk's backward comes next
                pending.enter_context(engine.accumulate(last=backwards[0] + 1 == total))
            return embed(segs)

        def backward(t, g):
            backwards[0] += 1
            with pending:
                engine.backward((t.float() * g).sum(), boundary=backwards[0] == total)

        def chunks(segs):
            return [segs[i : i + chunk] for i in range(0, len(segs), chunk)]

        loss = grad_cache_step(
            embed_chunk,
            chunks(q_segs),
            chunks(p_segs),
            chunks(n_segs) if n_segs else None,
            loss_fn=loss_fn,
            backward_fn=backward,
        )
    else:
        q, p = embed(q_segs), embed(p_segs)
        n = embed(n_segs) if n_segs else None
        loss = loss_fn(q, p, n)
        engine.backward(loss)
    engine.step()
    return loss


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch

    from diffembed.models.embedder import Embedder
    from diffembed.train.losses import info_nce

    cfg = TrainConfig.model_validate(config["cfg"])
    plan = ray.get(config["plan"])
    dev = ray.get(config["dev"]) if config.get("dev") is not None else []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")

    embedder = Embedder(cfg.embedder.model_copy(update={"device": str(device)}))
    model = build_trainable(embedder, cfg)
    engine = make_backend(cfg, model, device, world)
    embedder.model = engine.model  # the Embedder's forward now runs through DeepSpeed / DDP

    start_step, attempt, history = 0, 0, []
    # A restart after a failure resumes from this run's latest checkpoint; `--resume` from an earlier run's.
    checkpoint = ray.train.get_checkpoint() or (
        ray.train.Checkpoint(config["resume_from"]) if config.get("resume_from") else None
    )
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            client = engine.load(ckpt_dir)
            start_step, attempt = client["step"], client.get("attempt", 0) + 1
            if Path(ckpt_dir, HISTORY_FILE).is_file():
                history = json.loads(Path(ckpt_dir, HISTORY_FILE).read_text())
            log.info("rank %d resumed at step %d", rank, start_step)

    b = cfg.per_worker_batch_size
    gather = cfg.loss.gather_across_workers and world > 1
    chunk = cfg.loss.grad_cache_chunk_size

    def loss_fn(q, p, n):
        return info_nce(q, p, n, scale=cfg.loss.scale, gather=gather)

    for step in range(start_step, cfg.optim.max_steps):
        if cfg.run.fail_at_step is not None and step == cfg.run.fail_at_step and attempt == 0 and rank == 0:
            raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")
        started = time.perf_counter()
        rows = _step_rows(plan, step, rank, b)
        q_segs = embedder.query_segments([r["query"] for r in rows], [r["instruction"] for r in rows])
        p_segs = embedder.document_segments([r["positive"] for r in rows], windows="first")
        n_texts = [n for r in rows for n in r["negatives"]]
        n_segs = embedder.document_segments(n_texts, windows="first") if n_texts else []
        tokens = sum(len(s.ids) for s in (*q_segs, *p_segs, *n_segs))

        loss = train_step(embedder, engine, q_segs, p_segs, n_segs, loss_fn, chunk)

        elapsed = time.perf_counter() - started
        step_no = step + 1
        loss = loss.detach().float().clone()
        if world > 1:  # report the global batch's loss, not rank 0's share
            torch.distributed.all_reduce(loss)
            loss /= world
        metrics = {
            "step": step_no,
            "attempt": attempt,
            "loss": float(loss),
            "lr": engine.lr(),
            "samples_per_s": cfg.optim.global_batch_size / elapsed,
            "tokens_per_s": tokens * world / elapsed,
        }
        if dev and cfg.eval.every and step_no % cfg.eval.every == 0:
            metrics.update({f"dev_{k}": v for k, v in _evaluate(embedder, engine, dev).items()})
        history.append({k: v for k, v in metrics.items() if k in ("step", "loss", "lr", "samples_per_s")
                        or k.startswith("dev_")})
        save = step_no % cfg.run.checkpoint_every == 0 or step_no == cfg.optim.max_steps
        if save or step_no % cfg.run.log_every == 0:
            probe = _probe(embedder, engine) if step_no == cfg.optim.max_steps else None
            _report(engine, {**metrics, "backend": engine.name}, save, attempt, rank, probe, history)


def _evaluate(embedder, engine, dev) -> dict[str, float]:
    """Dev-set retrieval metrics of the model being trained; every rank runs it (ZeRO-3 needs them all)."""
    from diffembed.train.dev_eval import dev_ndcg

    engine.eval()
    try:
        return dev_ndcg(embedder, dev)
    finally:
        engine.train()


def _probe(embedder, engine) -> list[list[float]]:
    """Embeddings of fixed texts from the final model (eval mode), to check the export against."""
    import torch

    engine.eval()
    with torch.no_grad():
        vectors = embedder.forward(embedder.collate(embedder.document_segments(PROBE_TEXTS, windows="first")))
    engine.train()
    return vectors.float().cpu().tolist()


def _report(engine, metrics: dict[str, Any], save: bool, attempt: int, rank: int, probe=None, history=()) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not engine.save(tmp, {"step": metrics["step"], "attempt": attempt}, rank):
            ray.train.report(metrics)  # the torch backend: rank 0 alone reports the checkpoint
            return
        if rank == 0:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            Path(tmp, HISTORY_FILE).write_text(json.dumps(list(history)))  # every step so far, across restarts
            if probe is not None:  # the final model's embeddings of PROBE_TEXTS, to check exports against
                Path(tmp, PROBE_FILE).write_text(json.dumps({"texts": PROBE_TEXTS, "embeddings": probe}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ---------------------------------------------------------------------------------------------- driver


def build_plan(cfg: TrainConfig) -> list[list[dict]]:
    from diffembed.files import expand_files
    from diffembed.train.data import plan_batches, read_pairs

    files = expand_files(cfg.data.train_files, "data.train_files")
    pairs, bad = read_pairs(files, cfg.data.format, cfg.data.hard_negatives, cfg.data.bad_rows)
    if bad.count:
        print(f"skipped {bad.count} bad training rows, e.g. {bad.examples[0]}")
    return plan_batches(
        pairs, cfg.optim.global_batch_size, cfg.optim.max_steps, cfg.data.same_source_batches, cfg.data.shuffle_seed
    )


def latest_checkpoint(run_dir: Path) -> str:
    """The newest Ray checkpoint directory under an earlier run's directory."""
    from diffembed.config import ConfigError

    candidates = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"--resume: no checkpoint_* directories in {run_dir}")
    return str(candidates[-1].resolve())


def scaling_config(cfg: TrainConfig):
    """Ray Train's ScalingConfig: `run.num_workers` workers, each one bundle of `cfg.worker_resources()`."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=cfg.worker_resources()
    )


def train(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run the training job on the current Ray cluster; returns final metrics and the export path."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from diffembed.train.export import export_from_checkpoint

    cfg.check_files()
    if not ray.is_initialized():
        ray.init()
    plan = build_plan(cfg)
    dev = _dev_pairs(cfg)
    before = _dev_metrics(cfg, cfg.embedder, dev) if dev else {}
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not cfg.run.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TORCH_EXTENSIONS_DIR", "DIFFEMBED_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    storage = str(Path(cfg.run.storage_path).expanduser().resolve()) if "://" not in cfg.run.storage_path else cfg.run.storage_path
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": ray.put(plan),
            "resume_from": latest_checkpoint(Path(resume)) if resume else None,
            "dev": ray.put(dev) if dev and cfg.eval.every else None,
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    export = export_from_checkpoint(cfg, result.checkpoint, history=_history(result.checkpoint))
    metrics["export_dir"] = str(export)
    metrics["checkpoint_dir"] = result.checkpoint.path
    if dev:
        from diffembed.config import EmbedderConfig

        after = _dev_metrics(cfg, EmbedderConfig(model=str(export)), dev)
        metrics.update({f"dev_{k}_before": v for k, v in before.items()})
        metrics.update({f"dev_{k}": v for k, v in after.items()})
    return metrics


def _dev_pairs(cfg: TrainConfig):
    from diffembed.files import expand_files
    from diffembed.train.data import load_pairs

    if not cfg.eval.dev_files:
        return []
    files = expand_files(cfg.eval.dev_files, "eval.dev_files")
    return load_pairs(files, cfg.data.format, 0, "skip")[0]


def _dev_metrics(cfg: TrainConfig, embedder_cfg, dev) -> dict[str, float]:
    """nDCG@10 etc. on the dev rows, computed in a Ray task (on a GPU when training uses them)."""
    import ray

    def run(embedder_cfg, dev):
        from diffembed.models.embedder import Embedder
        from diffembed.train.dev_eval import dev_ndcg

        return dev_ndcg(Embedder(embedder_cfg), dev)

    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.run.use_gpu else 0)(run)
    return ray.get(task.remote(embedder_cfg, dev))


def _history(checkpoint) -> list[dict[str, Any]]:
    with checkpoint.as_directory() as ckpt_dir:
        path = Path(ckpt_dir, HISTORY_FILE)
        return json.loads(path.read_text()) if path.is_file() else []
