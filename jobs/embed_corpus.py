"""Embed a corpus into Qdrant with Ray Data: parse the config, then one library call.

    python jobs/embed_corpus.py --config jobs/configs/embed_cpu.yaml [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/embed_corpus.py --config ...
"""

from __future__ import annotations

import sys

from diffembed.cli import job_main


def run(config: str, overrides: list[str]) -> dict:
    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus

    return embed_corpus(EmbedCorpusConfig.from_yaml(config, overrides))


def main(argv: list[str] | None = None) -> int:
    return job_main("Embed a corpus into a Qdrant collection (idempotent, resumable).", "EmbedCorpusConfig", run, argv)


if __name__ == "__main__":
    sys.exit(main())
