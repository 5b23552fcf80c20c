"""The training run's dev evaluation shared by its ranks: two processes in a real gloo group each encode half of the
dev texts (round robin) and receive the other half; the metrics equal one process encoding everything.

`encode_shared` is checked with a plain encode function that records what it was given (any shape, a rank with
nothing to encode); `dev_ndcg` with the packaged MiniLM, sharded on two ranks vs unsharded in this process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.multiprocessing as mp

from diffembed.train.data import Pair
from ray_head import free_port

WORLD = 2
ANIMALS = ["zebra", "otter", "heron", "walrus", "badger", "lynx", "gecko"]
COLOURS = ["red", "blue", "green", "black", "white"]
# "the zebra": which colour? A ranking the base model gets partly wrong. 35 queries; the negatives are other
# queries' positives, so 35 documents.
PAIRS = [Pair(query=f"the {a}", positive=f"A {c} {a} was seen by the river.",
              negatives=[f"A {COLOURS[(i + 1) % 5]} {a} was seen by the river."],
              instruction="Find the animal" if i % 2 else None)
         for i, (a, c) in enumerate((a, c) for a in ANIMALS for c in COLOURS)]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from diffembed import Embedder, EmbedderConfig
    from diffembed.train.dev_eval import dev_ndcg, encode_shared

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    given: list[list[str]] = []

    def encode(items: list[str]) -> np.ndarray:  # (n, 2, 3): a multivector's shape; item i's values say who/what
        given.append(list(items))
        return np.array([[[rank, len(t), 0.5]] * 2 for t in items], dtype=np.float32)

    items = [f"item {'x' * i}" for i in range(5)]
    five = encode_shared(encode, items, (rank, WORLD))
    one = encode_shared(encode, items[:1], (rank, WORLD))  # rank 1 encodes nothing
    embedder = Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=32))
    metrics = dev_ndcg(embedder, PAIRS, (rank, WORLD))
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"given": given, "five": five.tolist(), "one": one.tolist(), "metrics": metrics}, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dev_shared")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(WORLD)]


def test_each_rank_encodes_its_round_robin_share_and_all_get_every_vector_in_order(ranks):
    items = [f"item {'x' * i}" for i in range(5)]
    assert ranks[0]["given"] == [items[0::2], items[:1]]
    assert ranks[1]["given"] == [items[1::2]]  # nothing to encode: not called, and still handed the vectors
    expected = [[[i % 2, len(t), 0.5]] * 2 for i, t in enumerate(items)]  # (5, 2, 3), item i from rank i % 2
    assert ranks[0]["five"] == ranks[1]["five"] == expected
    assert ranks[0]["one"] == ranks[1]["one"] == expected[:1]


def test_sharded_dev_metrics_equal_one_process_encoding_everything(ranks):
    from diffembed import Embedder, EmbedderConfig
    from diffembed.train.dev_eval import dev_ndcg

    whole = dev_ndcg(Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", max_length=32)), PAIRS)
    assert 0.0 < whole["ndcg@10"] < 1.0  # neither trivial nor hopeless: a ranking to get wrong
    for rank in ranks:
        assert rank["metrics"].keys() == whole.keys()
        for key, value in whole.items():
            assert rank["metrics"][key] == pytest.approx(value, abs=1e-6), key
