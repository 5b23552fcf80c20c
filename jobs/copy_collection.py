"""Copy an embedded (Qdrant Edge) collection to a Qdrant server: parse the config, then one library call.

    python jobs/copy_collection.py --config jobs/configs/copy_to_server.yaml [key=value ...]

Resumable: a rerun skips the points the target already holds. Prints the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from diffembed.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Copy a Qdrant Edge collection to a Qdrant server (resumable).")
    parser.add_argument("--config", required=True, help="YAML file with a CopyConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    # qdrant-client's background version check warns (several lines) when the server is unreachable; the
    # copy reports that itself, in one line
    warnings.filterwarnings("ignore", message="Failed to obtain server version")
    try:
        from diffembed.index.copy import CopyConfig, copy_collection

        cfg = CopyConfig.from_yaml(args.config, args.overrides)
        summary = copy_collection(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
