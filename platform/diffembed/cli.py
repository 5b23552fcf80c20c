"""The shape every thin job shares: `--config file.yaml [key=value ...]` -> one library call -> JSON summary.

A ConfigError (bad config, bad data, an unusable store) is printed as one `error: ...` line and the job exits
2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from diffembed.config import ConfigError


def job_main(description: str, config_name: str, run: Callable[[str, list[str]], Any],
             argv: list[str] | None = None) -> int:
    """Parse `--config` + overrides, call `run(config_path, overrides)`, print its result as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML file with a {config_name}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        result = run(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
