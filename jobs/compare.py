"""The diffusion-vs-autoregressive study as one job: fine-tune each backbone, evaluate each, one table + plot.

    python jobs/compare.py --config jobs/configs/compare_tiny.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/compare.py --config jobs/configs/compare_7b.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from diffembed.cli import print_config_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune and evaluate several backbones with one recipe.")
    parser.add_argument("--config", required=True, help="YAML file with a CompareConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        from diffembed.eval.compare import CompareConfig

        cfg = CompareConfig.from_yaml(args.config, args.overrides)
        for backbone in cfg.backbones:  # every training config is checked before Ray starts
            cfg.train_config(backbone).check_files()
        from diffembed.eval.compare import run_compare

        summary = run_compare(cfg)
    except Exception as exc:  # a ConfigError here or on the cluster: one line; anything else: its traceback
        if not print_config_error(exc):
            raise
        return 2
    print(open(summary["markdown"]).read())
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
