"""Copy an embedded (Qdrant Edge) collection to a Qdrant server: parse the config, then one library call.

    python jobs/copy_collection.py --config jobs/configs/copy_to_server.yaml [key=value ...]

Resumable: a rerun skips the points the target already holds. Prints the JSON summary.
"""

from __future__ import annotations

import sys
import warnings

from diffembed.cli import job_main


def run(config: str, overrides: list[str]) -> dict:
    from diffembed.index.copy import CopyConfig, copy_collection

    return copy_collection(CopyConfig.from_yaml(config, overrides))


def main(argv: list[str] | None = None) -> int:
    # qdrant-client's background version check warns (several lines) when the server is unreachable; the
    # copy reports that itself, in one line
    warnings.filterwarnings("ignore", message="Failed to obtain server version")
    return job_main("Copy a Qdrant Edge collection to a Qdrant server (resumable).", "CopyConfig", run, argv)


if __name__ == "__main__":
    sys.exit(main())
