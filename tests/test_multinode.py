"""Jobs on a multi-node Ray cluster (several raylets on this machine): what opens a local path runs on the driver's node.

An Edge store is a folder on one node's disk and a local input file is a file there, both opened by path. The
batch job's store owner and the miner's store searcher ask Ray for no CPU, and Ray places such actors on a
random node; Ray Data spreads its read tasks over the cluster. On a real cluster the collection would be written
to (or searched on) another machine than the one the path names, and the reads would fail there. Here every
node shares one disk, so misplaced work would still succeed; the test reads where each actor and task ran (Ray's
state API) and requires the driver's node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORE_ACTORS = ("StoreOwner", "StoreMiner")
READ_TASKS = ("_scan_unit", "FlatMap", "_scan_shard")  # the batch job's pre-pass and reads; mining's (rowfiles)


def run_on_four_nodes(work: Path) -> dict:
    """Start a head (2 CPUs) and three 1-CPU nodes, run the batch job and store mining, report placements."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

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
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        driver = ray.get_runtime_context().get_node_id()
        topics = ["harbour", "glacier", "violin", "orchard", "comet", "bakery", "lighthouse", "volcano"]
        docs = [{"id": f"d{i}", "text": f"A note about the {t}: the {t} is described here, number {i}."}
                for i, t in enumerate(topics)]
        for i, (t, d) in enumerate(zip(topics, docs)):  # a file each: many read tasks, for Ray to place
            (work / f"corpus{i}.jsonl").write_text(json.dumps(d) + "\n")
            (work / f"pairs{i}.jsonl").write_text(json.dumps({"query": f"tell me about the {t}", "positive": d["text"],
                                                              "doc_id": d["id"]}) + "\n")
        embedder = {"model": "all-MiniLM-L6-v2", "max_length": 32}
        store = {"path": str(work / "qdrant"), "collection": "docs"}
        embedded = embed_corpus(EmbedCorpusConfig.from_dict({
            "embedder": embedder, "input": {"paths": [str(work / "corpus*.jsonl")]},
            "encode": {"actors": 1, "batch_size": 4}, "store": store}), progress=False)
        mined = mine_negatives(MineNegativesConfig.from_dict({
            "embedder": embedder, "input": {"files": [str(work / "pairs*.jsonl")]}, "output": str(work / "mined.jsonl"),
            "candidates": {"source": "store", "store": store, "positive_id_field": "doc_id"},
            "negatives": {"per_query": 1, "window": 5}, "encode": {"actors": 1, "batch_size": 4}}))
        placed = [{"name": a.class_name, "node": a.node_id} for a in list_actors(detail=True, limit=1000)]
        tasks = [{"name": t.name, "node": t.node_id} for t in list_tasks(detail=True, limit=10000)
                 if t.type == "NORMAL_TASK"]
        return {"driver": driver, "nodes": len({n["NodeID"] for n in ray.nodes() if n["Alive"]}), "actors": placed,
                "tasks": tasks,
                "points": embedded["points_in_collection"], "mined_rows": mined["rows"],
                "negatives": mined["negatives"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_local_files_and_embedded_stores_are_opened_on_the_drivers_node(tmp_path):
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 4 and result["points"] == 8 and result["mined_rows"] == 8 and result["negatives"] == 8
    store_actors = [a for a in result["actors"] if any(name in a["name"] for name in STORE_ACTORS)]
    assert {a["name"].split("(")[-1].rstrip(")") for a in store_actors} >= set(STORE_ACTORS), result["actors"]
    assert all(a["node"] == result["driver"] for a in store_actors), store_actors
    reads = [t for t in result["tasks"] if any(name in t["name"] for name in READ_TASKS)]
    assert {name for name in READ_TASKS if any(name in t["name"] for t in reads)} == set(READ_TASKS), result["tasks"]
    assert all(t["node"] == result["driver"] for t in reads), reads
    # the work that opens no file still spreads: some task or actor ran on another node
    assert {t["node"] for t in result["tasks"]} | {a["node"] for a in result["actors"]} != {result["driver"]}


if __name__ == "__main__":
    print(json.dumps(run_on_four_nodes(Path(sys.argv[1]))), flush=True)
