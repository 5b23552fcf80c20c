"""Input files shared by every job: local globs expanded and checked before anything starts, and JSON Lines
read with their line numbers, so every reader reports a bad line as `file:line`."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from diffembed.config import ConfigError


def expand_files(patterns: list[str], what: str) -> list[str]:
    """Local globs expanded (sorted, each must match); remote URIs (`s3://…`) are left for their reader."""
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise ConfigError(f"{what}: no file matches {pattern!r}")
        files.extend(matches)
    if not files:
        raise ConfigError(f"{what}: no input files given")
    return files


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for every non-blank line; a line that is not JSON yields a
    `ValueError("malformed JSON line (...)")` in place of the value, so the caller decides: skip, count or fail."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"malformed JSON line ({exc.msg})")


def decode_lines(data: bytes) -> list[str]:
    """A file's bytes as text lines (undecodable bytes replaced, so the bad line is still reported by number)."""
    return data.decode("utf-8", errors="replace").splitlines()
