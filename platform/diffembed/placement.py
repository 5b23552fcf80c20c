"""Where Ray runs the work that opens one machine's disk: on the node of the process that started it.

A local path names a file on this node (a job's driver: the head node for a submitted job); a URI (`s3://`,
`gs://`, `file://` for a mount every node shares) names one every node can open. Left to Ray, a task runs
wherever there is room (Ray Data spreads its tasks over the cluster) and an actor that asks for no CPU on a
random node, so the reads of local files and the actors that hold an embedded store's folder are pinned here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffembed.files import is_uri


def on_this_node() -> dict[str, Any]:
    """Ray options that keep a task or actor on the node running this code (a hard constraint: Ray's own node-id
    label, which Ray core and Ray Data both take as a named option)."""
    import ray

    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def where_to_read(paths: Iterable[str]) -> dict[str, Any]:
    """Ray options for tasks that read `paths`: on this node when any is a local path, anywhere when all are URIs."""
    return on_this_node() if any(not is_uri(p) for p in paths) else {}
