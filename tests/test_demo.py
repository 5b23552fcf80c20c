"""`make demo` end to end: jobs/demo.py as a user runs it, in a fresh process, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIT = re.compile(r"^\s+\d+\.\s+-?\d\.\d+\s+(\S+):")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "jobs/demo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_demo_finds_gzip_for_a_gzip_query(tmp_path):
    result = run_demo("--limit", "300", "--workdir", str(tmp_path), "compress a file with gzip")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.match(r"^300 documents \(\d+ stdlib modules\) encoded in ", lines[0]), lines[0]
    start = lines.index("query: compress a file with gzip")
    hits = [m.group(1) for line in lines[start + 1 :] if (m := HIT.match(line))]
    assert len(hits) == 3, result.stdout  # default --top-k
    assert any(hit == "gzip" or hit.startswith("gzip.") for hit in hits), result.stdout
    assert "300 embedded now" in lines[0]
    assert any(line.startswith("Ray Serve application up at http://127.0.0.1:") for line in lines)  # hits over HTTP
    again = run_demo("--limit", "300", "--workdir", str(tmp_path), "compress a file with gzip")
    assert again.returncode == 0 and "0 embedded now" in again.stdout.splitlines()[0]  # idempotent rerun


def test_empty_query_is_a_one_line_error():
    result = run_demo("")
    assert result.returncode != 0
    assert result.stdout == ""
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: "), result.stderr
