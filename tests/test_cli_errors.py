"""A ConfigError raised on the cluster is the job's one `error:` line: `diffembed.cli.config_error_line` finds it
under each wrapping Ray puts around it (real local Ray: a task, an actor's constructor; Ray Train's worker group
error as Ray Train builds it), and leaves every other error alone (its traceback stays)."""

from __future__ import annotations

import pytest
import ray

from diffembed.cli import config_error_line
from diffembed.config import ConfigError
from diffembed.index.store import StoreError


def test_config_errors_raised_on_the_cluster_are_one_line(ray_cluster):
    def _task(message: str):  # defined here: pickled by value (workers cannot import this test module)
        raise ConfigError(message)

    class _Actor:
        def __init__(self, message: str):
            raise StoreError(message)  # a subclass: named by its own module in a traceback's text

        def ping(self) -> None:
            pass

    node = ray.util.get_node_ip_address()
    with pytest.raises(Exception) as task_error:
        ray.get(ray.remote(_task).remote("bad input: row 3"))
    assert config_error_line(task_error.value) == f"bad input: row 3 (raised on node {node})"

    actor = ray.remote(num_cpus=0)(_Actor).remote("store locked: another process holds it")
    with pytest.raises(ray.exceptions.ActorDiedError) as actor_error:
        ray.get(actor.ping.remote())
    assert config_error_line(actor_error.value) == f"store locked: another process holds it (raised on node {node})"

    with pytest.raises(Exception) as other:
        ray.get(ray.remote(lambda: 1 / 0).remote())
    assert config_error_line(other.value) is None  # a bug keeps its traceback


def test_wrapped_and_chained_config_errors():
    from ray.train import WorkerGroupError

    group = WorkerGroupError("rank 1 failed", {0: RuntimeError("collective aborted"), 1: ConfigError("no CUDA here")})
    assert config_error_line(group) == "no CUDA here"
    try:
        try:
            raise ConfigError("first  line\nsecond")
        except ConfigError as exc:
            raise RuntimeError("while handling") from exc
    except RuntimeError as outer:
        assert config_error_line(outer) == "first line second"
    assert config_error_line(ValueError("x")) is None
