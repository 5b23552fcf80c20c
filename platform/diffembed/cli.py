"""The shape every thin job shares: `--config file.yaml [key=value ...]` -> one library call -> JSON summary.

A ConfigError (bad config, bad data, an unusable store, a model this machine cannot run) is printed as one
`error: ...` line and the job exits 2, wherever it was raised: in the job's process, or on the cluster, in a Ray task,
a Ray Data actor's constructor (an encoder loading its model on a GPU node) or a Ray Train worker, where Ray wraps
it (`config_error_line`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from diffembed.config import ConfigError


def job_main(description: str, config_name: str, run: Callable[[str, list[str]], Any],
             argv: list[str] | None = None) -> int:
    """Parse `--config` + overrides, call `run(config_path, overrides)`, print its result as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML file with a {config_name}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    args = parser.parse_args(argv)
    try:
        result = run(args.config, args.overrides)
    except Exception as exc:
        if not print_config_error(exc):
            raise
        return 2
    print(json.dumps(result, indent=2))
    return 0


def print_config_error(exc: BaseException) -> bool:
    """Print the job's one `error:` line when `exc` is or carries a ConfigError; False for anything else."""
    line = config_error_line(exc)
    if line is None:
        return False
    print(f"error: {line}", file=sys.stderr)
    return True


def _error_names() -> set[str]:
    """Qualified names of ConfigError and its subclasses, as a traceback's last line spells them."""
    names, todo = set(), [ConfigError]
    while todo:
        cls = todo.pop()
        names.add(f"{cls.__module__}.{cls.__qualname__}")
        todo.extend(cls.__subclasses__())
    return names


_IP = re.compile(r"\bip=([0-9A-Fa-f.:]+)")


def config_error_line(exc: BaseException) -> str | None:
    """The message of the ConfigError that `exc` is or carries, with the node it was raised on when that was not
    here; None when there is none. Ray keeps a remote ConfigError as the `cause` of a RayTaskError (tasks), only as
    the text of the traceback in an ActorDiedError (an actor whose constructor raised it: Ray Data's actor pools),
    and among `worker_failures` in Ray Train's WorkerGroupError; each is followed, as are `__cause__` and
    `__context__`."""
    names = _error_names()
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, ConfigError):  # a RayTaskError: the original, pickled back; its text names the node
            return with_node(str(cause), getattr(err, "ip", None) or _node_in(str(err)))
        if isinstance(err, ConfigError) and not hasattr(err, "traceback_str"):
            return with_node(str(err), None)
        if type(err).__module__.startswith("ray."):  # only a traceback's text left: its last ConfigError line
            text = str(err)
            found = [line.split(": ", 1)[1] for line in text.splitlines()
                     if line.split(": ", 1)[0].strip() in names and ": " in line]
            if found:
                return with_node(found[-1], _node_in(text))
        failures = getattr(err, "worker_failures", None)
        todo.extend([err.__cause__, err.__context__, cause if isinstance(cause, BaseException) else None,
                     *(failures.values() if isinstance(failures, dict) else ())])
    return None


def _node_in(text: str) -> str | None:
    found = _IP.search(text)
    return found.group(1) if found else None


def with_node(message: str, ip: str | None) -> str:
    """A ConfigError's message on one line, naming the node it was raised on (when known)."""
    message = " ".join(message.split())
    return f"{message} (raised on node {ip})" if ip else message
