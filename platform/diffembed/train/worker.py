"""What every Ray Train worker runs: build the trainable model, step through its slice of the batch plan, report.

Each worker loads the backbone through the same `Embedder` that batch inference and serving use, wraps it with
peft LoRA (or trains it fully), hands it to a backend (`diffembed.train.backends`) and steps through its share of
the shared global-batch plan. Checkpoints go through `diffembed.train.checkpoints.report`; on a restart (worker
failure or `--resume`) the loop reloads the latest one and continues at its step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from diffembed.train import checkpoints
from diffembed.train.backends import make_backend, use_training_attention
from diffembed.train.config import LORA_TARGETS, TrainConfig

log = logging.getLogger(__name__)

BERT_LORA_TARGETS = ["query", "key", "value", "dense"]
PROBE_TEXTS = [
    "diffusion language models read text in both directions",
    "a query about retrieval",
    "The quick brown fox jumps over the lazy dog.",
]


def lora_targets(cfg: TrainConfig, family: str) -> list[str]:
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


def train_step(embedder, engine, q_segs, p_segs, n_segs, loss_fn, chunk: int | None):
    """One optimizer step on this rank's share of the global batch; returns the (local) loss.

    Every group (queries, positives, negatives) is cut into length-sorted sub-batches (`plan_groups`), each padded
    only to its own longest row, and put back in input order before the loss: < 10 % padding on a lognormal mix
    instead of ~50 % for one padded batch, and a third of the activation memory (bench/gpu_train.py).
    Without `chunk`: the sub-batches' activations all stay for one backward. With it, GradCache over chunks of at
    most `chunk` rows (`grad_cache_in_order`): DDP all-reduces gradients once, after the step's last chunk
    (DeepSpeed is told the same through its gradient-accumulation boundary).
    A multivector embedder (mask readout, `mask_vectors: multi`) gives (b, K, D) embeddings; `loss_fn` (`make_loss`)
    scores them by MaxSim (`losses.similarity`), on both paths.
    In a distributed step every rank must call this: the ranks agree on their number of sub-batches per group
    (`plan_groups`), which DeepSpeed's collectives inside forward and backward need."""
    from diffembed.train.microbatch import embed_in_order, grad_cache_in_order, plan_groups

    def embed(segs):
        with engine.autocast():
            return embedder.forward(embedder.collate(segs))  # (b, D); (b, K, D) for a multivector

    if chunk:
        loss = grad_cache_in_order(embed, engine, [q_segs, p_segs, n_segs], loss_fn, max_rows=chunk)
    else:
        groups = [q_segs, p_segs, n_segs]
        plans = plan_groups([[len(s.ids) for s in g] for g in groups])
        q, p, n = (embed_in_order(embed, g, plan) if g else None for g, plan in zip(groups, plans))  # (b, [K,] D)
        loss = loss_fn(q, p, n)
        engine.backward(loss)
    engine.step()
    return loss


def make_loss(cfg: TrainConfig, width: int, gather: bool):
    """`loss_fn(q, p, n)` of the config: InfoNCE, or its Matryoshka sum over `loss.matryoshka_dims` (the full
    `width` included); on single vectors (B, D) or multivectors (B, K, D), scored by `losses.similarity`.
    ConfigError when a Matryoshka size exceeds the width of the loaded model's embeddings."""
    from functools import partial

    from diffembed.train.losses import info_nce, matryoshka_info_nce

    prefixes = cfg.loss.matryoshka(width)
    if prefixes is None:
        return partial(info_nce, scale=cfg.loss.scale, gather=gather)
    dims, weights = zip(*prefixes)
    return partial(matryoshka_info_nce, dims=dims, weights=weights, scale=cfg.loss.scale, gather=gather)


def load_on_every_rank(cfg: TrainConfig, device, world: int):
    """This rank's Embedder, or None when any rank could not load it for a reason of the config's (what its node
    cannot run: no CUDA, bf16 unsupported, flash-attn missing, no checkpoint at that path on that node). The ranks
    agree on the outcome (one all-gather); then rank 0 records the first such error in the run directory
    (`rundir.record_config_error`) and every rank returns: the driver raises it as a ConfigError. Raised here
    instead, it would be a worker failure, which Ray Train retries `run.max_failures` times (reloading the model on
    every rank each time) although the config, not the cluster, is at fault."""
    import ray
    import ray.train
    import torch.distributed as dist

    from diffembed.cli import with_node
    from diffembed.config import ConfigError
    from diffembed.models.embedder import Embedder
    from diffembed.train.rundir import record_config_error

    embedder, problem = None, None
    try:
        embedder = Embedder(cfg.embedder.model_copy(update={"device": str(device), "compile": False}))
    except ConfigError as exc:
        problem = with_node(str(exc), ray.util.get_node_ip_address())
    problems = [problem]
    if world > 1 and dist.is_initialized():
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first is None:
        return embedder
    if ray.train.get_context().get_world_rank() == 0:
        record_config_error(cfg, first)
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import torch

    from diffembed.train.data import StepRows

    cfg = TrainConfig.model_validate(config["cfg"])
    dev = ray.get(config["dev"]) if config.get("dev") is not None else []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    use_training_attention(device)

    # compile is an inference setting: a compiled module would wrap the model object as built here, while the dev
    # evaluation below must run the one DeepSpeed trains (`embedder.model` is replaced; ZeRO-3 partitions it).
    embedder = load_on_every_rank(cfg, device, world)
    if embedder is None:
        return
    loss_fn = make_loss(cfg, embedder.dimension, cfg.loss.gather_across_workers and world > 1)
    model = build_trainable(embedder, cfg)
    engine = make_backend(cfg, model, device, world)
    embedder.model = engine.model  # the Embedder's forward now runs through DeepSpeed / DDP

    start_step, attempt, history = 0, 0, []
    # A restart after a failure resumes from this run's latest checkpoint; `--resume` from an earlier run's.
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            client = engine.load(ckpt_dir)
            start_step, attempt = client["step"], client.get("attempt", 0) + 1
            history = checkpoints.read_history(ckpt_dir)
            log.info("rank %d resumed at step %d", rank, start_step)

    b = cfg.per_worker_batch_size
    plan = ray.get(config["plan"])  # places only (`loop.build_plan`): this rank fetches its rows a window at a time
    step_rows = StepRows(plan["blocks"], plan["block"], plan["offset"], rank, b)
    chunk = cfg.loss.grad_cache_chunk_size

    # Weights every rank holds whole: the ranks share the dev encoding. ZeRO-3's forwards are collective.
    partitioned = cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3
    dev_shard = None if partitioned else (rank, world)
    attempt_started = time.monotonic()
    for step in range(start_step, cfg.optim.max_steps):
        if cfg.run.fail_at_step is not None and step == cfg.run.fail_at_step and attempt == 0 and rank == 0:
            raise RuntimeError(f"injected failure at step {step} (run.fail_at_step)")
        started = time.perf_counter()
        rows = step_rows(step)
        q_segs = embedder.query_segments([r["query"] for r in rows], [r["instruction"] for r in rows])
        p_segs = embedder.document_segments([r["positive"] for r in rows], windows="first", spans=False)
        n_texts = [n for r in rows for n in r["negatives"]]
        n_segs = embedder.document_segments(n_texts, windows="first", spans=False) if n_texts else []
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
            metrics.update({f"dev_{k}": v for k, v in _evaluate(embedder, engine, dev, dev_shard).items()})
        # `time` (Unix seconds at the step's end, reports and checkpoints of earlier steps included) gives the
        # run's end-to-end rate; samples_per_s is the step's own compute.
        history.append({k: v for k, v in metrics.items() if k in ("step", "loss", "lr", "samples_per_s")
                        or k.startswith("dev_")} | {"time": round(time.time(), 3)})
        save = step_no % cfg.run.checkpoint_every == 0 or step_no == cfg.optim.max_steps
        if rank == 0 and (step_no % cfg.run.log_every == 0 or step_no == cfg.optim.max_steps):
            # logged, not printed: Ray Train's print patch writes a worker's print twice to the job's console
            log.info(progress_line(metrics, cfg.optim.max_steps, step_no - start_step,
                                   time.monotonic() - attempt_started))
        if save or step_no % cfg.run.log_every == 0:
            probe = _probe(embedder, engine) if step_no == cfg.optim.max_steps else None
            checkpoints.report(engine, {**metrics, "backend": engine.name}, save, attempt, rank, probe, history)


def progress_line(metrics: dict[str, Any], max_steps: int, steps_done: int, seconds: float) -> str:
    """The job's console line for a step (rank 0, every `run.log_every` steps): where the run is, the loss, the
    step's own rate and the time left at this attempt's mean rate so far (checkpoints and dev evaluation included)."""
    step = metrics["step"]
    left = (max_steps - step) * seconds / max(steps_done, 1)
    dev = f"  dev nDCG@10 {metrics['dev_ndcg@10']:.4f}" if "dev_ndcg@10" in metrics else ""
    return (f"step {step}/{max_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
            f"{metrics['samples_per_s']:.1f} samples/s  {metrics['tokens_per_s']:.0f} tokens/s  "
            f"elapsed {_duration(seconds)}  left ~{_duration(left)}{dev}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _evaluate(embedder, engine, dev, shard: tuple[int, int] | None) -> dict[str, float]:
    """Dev-set retrieval metrics of the model being trained; every rank calls it (ZeRO-3 needs them all, the others
    share the encoding: `dev_eval.dev_ndcg`)."""
    from diffembed.train.dev_eval import dev_ndcg

    engine.eval()
    try:
        return dev_ndcg(embedder, dev, shard)
    finally:
        engine.train()


def _probe(embedder, engine) -> dict[str, Any]:
    """Embeddings of fixed texts from the final model (eval mode), to check the export against."""
    import torch

    engine.eval()
    with torch.no_grad():
        vectors = embedder.forward(embedder.collate(embedder.document_segments(PROBE_TEXTS, windows="first")))
    engine.train()
    return {"texts": PROBE_TEXTS, "embeddings": vectors.float().cpu().tolist()}
