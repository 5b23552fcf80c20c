"""Mine hard negatives for training pairs with Ray Data: parse the config, then one library call.

    python jobs/mine_negatives.py --config jobs/configs/mine_exact.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/mine_negatives.py --config ...
"""

from __future__ import annotations

import sys

from diffembed.cli import job_main


def run(config: str, overrides: list[str]) -> dict:
    from diffembed.mining.config import MineNegativesConfig
    from diffembed.mining.job import mine_negatives

    return mine_negatives(MineNegativesConfig.from_yaml(config, overrides))


def main(argv: list[str] | None = None) -> int:
    return job_main("Add mined hard negatives to training pairs (the train job's data.hard_negatives).",
                    "MineNegativesConfig", run, argv)


if __name__ == "__main__":
    sys.exit(main())
