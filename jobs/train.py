"""Fine-tune an embedder with Ray Train + DeepSpeed: parse the config, then one library call.

    python jobs/train.py --config jobs/configs/train_tiny.yaml [key=value ...] [--resume RUN_DIR|CHECKPOINT_DIR]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --config ...
"""

from __future__ import annotations

import argparse
import json
import sys

from diffembed.cli import print_config_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Contrastive fine-tuning of a diffembed embedder.")
    parser.add_argument("--config", required=True, help="YAML file with a TrainConfig")
    parser.add_argument("--resume", help="an earlier run directory or URI (<storage_path>/<name>) to continue from "
                        "its latest checkpoint, or one checkpoint directory of it (<run>/checkpoint_*)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        from diffembed.train.config import TrainConfig

        cfg = TrainConfig.from_yaml(args.config, args.overrides)
        cfg.check_files()  # before Ray starts
        from diffembed.train.deepspeed import check_zero_options

        check_zero_options(cfg)
        if args.resume:
            from diffembed.train.checkpoints import resume_checkpoint

            resume_checkpoint(args.resume)  # a run or checkpoint directory: a local path or a URI (file://, s3://)
        from diffembed.train.loop import train

        metrics = train(cfg, resume=args.resume)  # bad rows, a taken run directory: ConfigError too
    except Exception as exc:  # a ConfigError here or on the cluster: one line; anything else: its traceback
        if not print_config_error(exc):
            raise
        return 2
    print(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
