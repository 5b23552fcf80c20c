"""Evaluate an embedder on retrieval tasks: parse the config, then one library call.

    python jobs/evaluate.py --config jobs/configs/eval_cpu.yaml [key=value ...] [--json]
    python jobs/evaluate.py --config jobs/configs/devbench.yaml --tune-fusion   # hybrid, fusion tuned on dev
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/evaluate.py --config ...

Writes <output_dir>/results.json and results.md and prints the table (or the JSON with --json).
--tune-fusion searches through Qdrant in hybrid mode, picks the fusion (rrf, dbsf, weighted x dense_weight) with
the best nDCG@10 on each BEIR task's dev split (`retrieval.tune_split`), stores it with the task's collection
(later hybrid searches there use it by default) and scores the test split with it.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffembed.cli import print_config_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score an embedder on BEIR-layout datasets and passkey/needle.")
    parser.add_argument("--config", required=True, help="YAML file with an EvalConfig")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--tune-fusion", action="store_true",
                        help="hybrid search through Qdrant; tune the fusion on the dev split and store it")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    if args.tune_fusion:  # before the user's overrides, so retrieval.tune_split=... etc. still apply
        args.overrides = ["retrieval.backend=qdrant", "retrieval.mode=hybrid", "retrieval.tune_fusion=true",
                          *args.overrides]
    try:
        from diffembed.eval.config import EvalConfig
        from diffembed.eval.runner import run_evaluation

        cfg = EvalConfig.from_yaml(args.config, args.overrides)
        results = run_evaluation(cfg)
    except Exception as exc:  # a ConfigError here or on the cluster: one line; anything else: its traceback
        if not print_config_error(exc):
            raise
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        from diffembed.eval.report import markdown_table, tuning_table

        print(markdown_table(results))
        if results.get("fusion_tuning"):
            print("\n" + tuning_table(results))
        print(f"results: {cfg.output_dir}/results.json, {cfg.output_dir}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
