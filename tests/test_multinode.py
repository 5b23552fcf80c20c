"""Jobs on a multi-node Ray cluster (several raylets on this machine): an embedded store stays on the driver's node.

An Edge store is a folder on one node's disk, opened by path. The batch job's store owner and the miner's
store searcher ask Ray for no CPU, and Ray places such actors on a random node of the cluster: on a real
cluster the collection would be written to (or searched on) another machine than the one the path names. Here
every node shares one disk, so a misplaced actor would still work; the test reads where each actor ran
(Ray's state API) and requires the driver's node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE_ACTORS = ("StoreOwner", "StoreMiner")


def run_on_four_nodes(work: Path) -> dict:
    """Start a head (2 CPUs) and three zero-CPU nodes, run the batch job and store mining, report placements."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from diffembed.batch.config import EmbedCorpusConfig
    from diffembed.batch.pipeline import embed_corpus
    from diffembed.mining.config import MineNegativesConfig
    from diffembed.mining.job import mine_negatives

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ray_head import free_port

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": free_port()})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=0)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        driver = ray.get_runtime_context().get_node_id()
        topics = ["harbour", "glacier", "violin", "orchard", "comet", "bakery", "lighthouse", "volcano"]
        docs = [{"id": f"d{i}", "text": f"A note about the {t}: the {t} is described here, number {i}."}
                for i, t in enumerate(topics)]
        (work / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (work / "pairs.jsonl").write_text("".join(json.dumps({"query": f"tell me about the {t}", "positive": d["text"],
                                                              "doc_id": d["id"]}) + "\n"
                                                  for t, d in zip(topics, docs)))
        embedder = {"model": "all-MiniLM-L6-v2", "max_length": 32}
        store = {"path": str(work / "qdrant"), "collection": "docs"}
        embedded = embed_corpus(EmbedCorpusConfig.from_dict({
            "embedder": embedder, "input": {"paths": [str(work / "corpus.jsonl")]},
            "encode": {"actors": 1, "batch_size": 4}, "store": store}), progress=False)
        mined = mine_negatives(MineNegativesConfig.from_dict({
            "embedder": embedder, "input": {"files": [str(work / "pairs.jsonl")]}, "output": str(work / "mined.jsonl"),
            "candidates": {"source": "store", "store": store, "positive_id_field": "doc_id"},
            "negatives": {"per_query": 1, "window": 5}, "encode": {"actors": 1, "batch_size": 4}}))
        placed = [{"name": a.class_name, "node": a.node_id} for a in list_actors(detail=True, limit=1000)]
        return {"driver": driver, "nodes": len({n["NodeID"] for n in ray.nodes() if n["Alive"]}), "actors": placed,
                "points": embedded["points_in_collection"], "mined_rows": mined["rows"],
                "negatives": mined["negatives"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_embedded_store_actors_stay_on_the_drivers_node(tmp_path):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 4 and result["points"] == 8 and result["mined_rows"] == 8 and result["negatives"] == 8
    store_actors = [a for a in result["actors"] if any(name in a["name"] for name in STORE_ACTORS)]
    assert {a["name"].split("(")[-1].rstrip(")") for a in store_actors} >= set(STORE_ACTORS), result["actors"]
    assert all(a["node"] == result["driver"] for a in store_actors), store_actors


if __name__ == "__main__":
    print(json.dumps(run_on_four_nodes(Path(sys.argv[1]))), flush=True)
