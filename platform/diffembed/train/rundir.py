"""Which run a run directory (`<storage_path>/<name>`) holds: the config that started it, saved beside its
checkpoints.

Ray Train restores a run from its directory whenever a run of the same name starts there again: that is how a
job driver that died (a head node lost, a RayJob retried) continues where it was. It does so whatever the new
config says, so a second, different run under the same name would silently continue the first one: train on the
old data and steps, or do nothing at all and export the old model again. `claim` tells the two apart: the same
config (what was trained, on what, how long) continues; anything else is refused, in one line, before Ray starts.
"""

from __future__ import annotations

import json
from typing import Any

from diffembed.config import ConfigError, dotted
from diffembed.train import storage
from diffembed.train.checkpoints import CHECKPOINT_PREFIX
from diffembed.train.config import TrainConfig

RECORD = "diffembed_run.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints (what it restores from)
# May change between a run and its continuation: how failures, reports and checkpoints are handled, not what is
# trained. (`name` and `storage_path` name the directory itself.)
OPERATIONAL = {"run.name", "run.storage_path", "run.max_failures", "run.report_poll_s", "run.keep_checkpoints",
               "run.log_every", "run.fail_at_step", "run.export_dir"}


def identity(cfg: TrainConfig, resume: str | None) -> dict[str, Any]:
    """What makes a run this run: its config (dotted keys) but the operational fields, and where it started from."""
    fields = {k: v for k, v in dotted(cfg.model_dump(mode="json")).items() if k not in OPERATIONAL}
    return {"config": fields, "resume": storage.normalize(resume) if resume else None}


def claim(cfg: TrainConfig, resume: str | None = None) -> bool:
    """Make `cfg.run_uri` this run's directory. True when it already holds checkpoints of this very run (the same
    identity: Ray Train continues it from the latest), False for a new run (the record is written, replacing one of
    a run that failed before its first checkpoint). ConfigError when it holds checkpoints of another run, or of a
    run without a record (started by hand, or by an older version)."""
    from pyarrow.fs import FileSelector

    uri, mine = cfg.run_uri, identity(cfg, resume)
    fs, path = storage.filesystem(uri)
    record = f"{path}/{RECORD}"
    try:
        listing = fs.get_file_info(FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"run.storage_path: cannot list {uri}: {exc}") from None
    names = {info.base_name for info in listing}
    started = SNAPSHOT in names or any(n.startswith(CHECKPOINT_PREFIX) for n in names)
    if RECORD in names and started:
        with fs.open_input_stream(record) as f:
            theirs = json.loads(f.read())
        if theirs == mine:
            return True
        differ = sorted(k for k in mine["config"].keys() | theirs.get("config", {}).keys()
                        if mine["config"].get(k) != theirs.get("config", {}).get(k))
        if mine["resume"] != theirs.get("resume"):
            differ.append("--resume")
        raise ConfigError(
            f"{uri} already holds run {cfg.run.name!r} with another config (differs in: {', '.join(differ[:6])}"
            f"{', ...' if len(differ) > 6 else ''}); rerun it unchanged to continue it, or give this run another "
            f"run.name (with --resume {uri} to start from its latest checkpoint)")
    if started:
        raise ConfigError(
            f"{uri} already holds a Ray Train run with no {RECORD} (not started by this job); give this run "
            f"another run.name (with --resume {uri} to start from its latest checkpoint)")
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(record) as f:
        f.write(json.dumps(mine, indent=1, sort_keys=True).encode())
    return False


FAILED = "diffembed_config_error.json"  # what the workers could not run (see worker.load_on_every_rank)


def record_config_error(cfg: TrainConfig, message: str) -> None:
    """Rank 0 records why the workers could not load the model: the driver raises it (`take_config_error`)."""
    fs, path = storage.filesystem(cfg.run_uri)
    with fs.open_output_stream(f"{path}/{FAILED}") as f:
        f.write(json.dumps({"error": message}).encode())


def take_config_error(cfg: TrainConfig) -> str | None:
    """The message `record_config_error` left in the run directory (removed as it is read), or None."""
    from pyarrow.fs import FileType

    fs, path = storage.filesystem(cfg.run_uri)
    if fs.get_file_info(f"{path}/{FAILED}").type != FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{FAILED}") as f:
        message = json.loads(f.read()).get("error")
    fs.delete_file(f"{path}/{FAILED}")
    return message
