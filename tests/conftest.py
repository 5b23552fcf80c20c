"""Shared fixtures: tiny checkpoints (built once per session) and the packaged MiniLM embedder."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from diffembed.testing.tiny import TINY_FAMILIES, write_tiny_checkpoint

ALL_FAMILIES = (*TINY_FAMILIES, "bert")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (tests that need their own start a subprocess)."""
    import ray

    os.environ["DS_ACCELERATOR"] = "cpu"  # the driver imports deepspeed for the training export
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of a tiny random checkpoint in that family's real layout."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: write_tiny_checkpoint(family, root / family, seed=i) for i, family in enumerate(TINY_FAMILIES)}


@pytest.fixture(scope="session")
def model_path(tiny_checkpoints):
    """Checkpoint path by family name; 'bert' is the packaged all-MiniLM-L6-v2."""
    from diffembed.models.loading import packaged_minilm_path

    def get(family: str) -> str:
        return str(packaged_minilm_path() if family == "bert" else tiny_checkpoints[family])

    return get


@pytest.fixture(scope="session")
def minilm():
    from diffembed import Embedder, EmbedderConfig

    return Embedder(EmbedderConfig())
