"""The training job's driver: build the batch plan, launch the workers with Ray Train, export, score.

`train()` runs on the job's driver (a small head node at scale): it has Ray tasks read and check the data, plans
every global batch over row places (the rows themselves stay in Ray's object store; each worker fetches its own),
hands the plan to `TorchTrainer(train_loop_per_worker)` (`diffembed.train.worker`), then runs the export as a Ray
task on a training-worker-sized slot (`diffembed.train.export.export_remote`) and, with dev files, scores the base
model before and the export after — neither ever loads model weights on the driver.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from diffembed.config import ConfigError
from diffembed.train import rundir, storage
from diffembed.train.checkpoints import resume_checkpoint
from diffembed.train.config import TrainConfig
from diffembed.train.deepspeed import check_zero_options
from diffembed.train.worker import build_trainable  # noqa: F401  (bench/)
from diffembed.train.worker import train_loop_per_worker


# Ray Train's controller polls the workers this often; each `ray.train.report` waits for the previous report to be
# taken, so with Ray's default of 2 s a step faster than that waited for the poll (TrainConfig.run.report_poll_s).
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def build_plan(cfg: TrainConfig) -> dict[str, Any]:
    """The run's batch plan, for the workers: the training rows' blocks (object references: the text stays in
    Ray's object store, `data.scan_pairs`) and each step's places in them, `block` and `offset` (steps,
    global_batch). The driver holds a few bytes per row, whatever the size of the set."""
    from diffembed.files import expand_files
    from diffembed.train.data import plan_positions, scan_pairs

    files = expand_files(cfg.data.train_files, "data.train_files")
    rows = scan_pairs(files, cfg.data.format, cfg.data.hard_negatives, cfg.data.bad_rows)  # logs what it skipped
    positions = plan_positions(
        rows.columns["source"], cfg.optim.global_batch_size, cfg.optim.max_steps, cfg.data.same_source_batches,
        cfg.data.shuffle_seed,
    )  # (steps, global_batch) row numbers in input order
    block, offset = rows.locate(positions)
    return {"blocks": rows.blocks, "block": block, "offset": offset}


def scaling_config(cfg: TrainConfig):
    """Ray Train's ScalingConfig: `run.num_workers` workers, each one bundle of `cfg.worker_resources()`."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=cfg.worker_resources()
    )


def train(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Run the training job on the current Ray cluster; returns final metrics and the export path. A run directory
    that holds this very run (a driver that died, run again unchanged) is continued from its latest checkpoint;
    one that holds another run is a ConfigError (`rundir.claim`)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from diffembed.train.export import export_remote

    cfg.check_files()
    check_zero_options(cfg)
    if rundir.claim(cfg, resume):
        print(f"continuing run {cfg.run_uri}: this config started it (Ray Train restores its latest checkpoint)")
    rundir.take_config_error(cfg)  # one left by a driver that died before reading it is not this run's
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
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "plan": ray.put(plan),
            "resume_from": resume_checkpoint(resume) if resume else None,
            "dev": ray.put(dev) if dev and cfg.eval.every else None,
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.normalize(cfg.run.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    # Read by the controller Ray Train starts in fit(): Ray propagates it from this process's environment. Set for
    # the call only, so that a later Ray Train run in this process polls at its own setting.
    with _environ(REPORT_POLL_ENV, str(cfg.run.report_poll_s)):
        result = trainer.fit()
    problem = rundir.take_config_error(cfg)  # the workers' nodes could not run the model (load_on_every_rank)
    if problem:
        raise ConfigError(problem)
    metrics = dict(result.metrics or {})
    export = export_remote(cfg, result.checkpoint, runtime_env={"env_vars": env})
    metrics["export_dir"] = export
    metrics["checkpoint_dir"] = result.checkpoint.path
    local_export = storage.local_path(export)
    if dev and local_export is None:
        print(f"dev metrics of the export skipped: {export} is not on a local filesystem")
    elif dev:
        from diffembed.config import EmbedderConfig

        after = _dev_metrics(cfg, EmbedderConfig(model=str(local_export)), dev)
        metrics.update({f"dev_{k}_before": v for k, v in before.items()})
        metrics.update({f"dev_{k}": v for k, v in after.items()})
    return metrics


@contextlib.contextmanager
def _environ(key: str, value: str):
    """`os.environ[key] = value` inside the block; the previous value (or none) again after it."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


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
