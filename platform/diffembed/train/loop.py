"""The per-worker training loop (runs inside Ray Train's TorchTrainer) and the driver that launches it.

Each worker loads the backbone through the same `Embedder` that batch inference and serving use, wraps it
with peft LoRA (or trains it fully), hands it to DeepSpeed, and steps through its slice of the shared
global-batch plan. Checkpoints are per-rank DeepSpeed shards reported through `ray.train.report`; on a
restart (worker failure or `--resume`) the loop reloads the latest one and continues at its step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from diffembed.train.config import TrainConfig

log = logging.getLogger(__name__)

BERT_LORA_TARGETS = ["query", "key", "value", "dense"]
CKPT_TAG = "ds"  # DeepSpeed tag inside every Ray checkpoint directory
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch
    from transformers import get_scheduler

    from diffembed.models.embedder import Embedder
    from diffembed.train.deepspeed import deepspeed_config
    from diffembed.train.losses import grad_cache_step, info_nce

    cfg = TrainConfig.model_validate(config["cfg"])
    plan = ray.get(config["plan"])
    dev = ray.get(config["dev"]) if config.get("dev") is not None else []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")

    embedder = Embedder(cfg.embedder.model_copy(update={"device": str(device)}))
    model = build_trainable(embedder, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = get_scheduler(
        cfg.optim.schedule if cfg.optim.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.optim.max_steps,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, cfg.run.use_gpu)
    )
    embedder.model = engine  # the Embedder's forward now runs through DeepSpeed

    start_step, attempt, history = 0, 0, []
    # A restart after a failure resumes from this run's latest checkpoint; `--resume` from an earlier run's.
    checkpoint = ray.train.get_checkpoint() or (
        ray.train.Checkpoint(config["resume_from"]) if config.get("resume_from") else None
    )
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG)
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
        p_segs = embedder.document_segments([r["positive"] for r in rows], chunk=False)
        n_texts = [n for r in rows for n in r["negatives"]]
        n_segs = embedder.document_segments(n_texts, chunk=False) if n_texts else []
        tokens = sum(len(s.ids) for s in (*q_segs, *p_segs, *n_segs))

        def embed(segs):
            return embedder.forward(embedder.collate(segs))  # (b, D)

        if chunk:
            backwards = [0]
            total = sum(math.ceil(len(g) / chunk) for g in (q_segs, p_segs, n_segs))

            def backward(t, g):
                backwards[0] += 1
                engine.set_gradient_accumulation_boundary(backwards[0] == total)
                engine.backward((t.float() * g).sum(), scale_wrt_gas=False)

            def chunks(segs):
                return [segs[i : i + chunk] for i in range(0, len(segs), chunk)]

            loss = grad_cache_step(
                embed,
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
            "lr": float(scheduler.get_last_lr()[0]),
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
            _report(engine, metrics, save, attempt, rank, probe, history)


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
        vectors = embedder.forward(embedder.collate(embedder.document_segments(PROBE_TEXTS, chunk=False)))
    engine.train()
    return vectors.float().cpu().tolist()


def _report(engine, metrics: dict[str, Any], save: bool, attempt: int, rank: int, probe=None, history=()) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": metrics["step"], "attempt": attempt})
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
    for key in ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_EXTENSIONS_DIR"):
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
