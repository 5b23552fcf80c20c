"""Embed a corpus into Qdrant with Ray Data: parse the config, then one library call.

    python jobs/embed_corpus.py --config jobs/configs/embed_cpu.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/embed_corpus.py --config ...
"""

from __future__ import annotations

import argparse
import json
import sys

from diffembed.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Embed a corpus into a Qdrant collection (idempotent, resumable).")
    parser.add_argument("--config", required=True, help="YAML file with an EmbedCorpusConfig")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        from diffembed.batch.config import EmbedCorpusConfig
        from diffembed.batch.pipeline import embed_corpus

        cfg = EmbedCorpusConfig.from_yaml(args.config, args.overrides)
        summary = embed_corpus(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
