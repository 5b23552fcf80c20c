"""Shared fixtures: tiny checkpoints (built once per session) and the packaged MiniLM embedder.

Hermetic: before anything else is imported, every cache and config location a library may write to is pointed into
one directory made for this run (`$DIFFEMBED_TEST_CACHE`, given by `make test` / .ci/run as a fresh `mktemp -d`, or
else created here and removed at the end). Subprocesses, Ray workers and the test Ray heads inherit it; nothing is
read from or written to ~/.cache, ~/.config or ~/.ray, so a warm machine behaves as a fresh one.
"""

from __future__ import annotations

import os
import secrets
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# variable -> location inside the run's directory (the Makefile's `test` target exports the same list).
HERMETIC_VARS = {
    "DIFFEMBED_CACHE": "diffembed",  # tiny:<family> checkpoints
    "HF_HOME": "huggingface",  # hub token, modules (remote code), datasets, xet
    "HF_HUB_CACHE": "huggingface/hub",
    "XDG_CACHE_HOME": "xdg/cache",  # the default ~/.cache of many libraries (torch hub, matplotlib, ...)
    "XDG_CONFIG_HOME": "xdg/config",
    "XDG_DATA_HOME": "xdg/data",
    "XDG_STATE_HOME": "xdg/state",
    "TORCH_HOME": "torch",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",  # DeepSpeed JIT-compiles its CPU ops here (cpu_adam with offload)
    "TRITON_CACHE_DIR": "triton",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",  # torch.compile's kernels (otherwise /tmp/torchinductor_<user>)
    "MPLCONFIGDIR": "matplotlib",  # font cache (otherwise ~/.config/matplotlib or ~/.cache/matplotlib)
    "MTEB_CACHE": "mteb",  # otherwise ~/.cache/mteb
    "RAY_AUTH_TOKEN_PATH": "ray/auth_token",  # a local ray.init() with token auth writes ~/.ray/auth_token otherwise
}


def _hermetic_environment() -> tuple[str, bool]:
    """Point every variable of HERMETIC_VARS into the run's directory; returns (directory, created here)."""
    run = os.environ.get("DIFFEMBED_TEST_CACHE")
    created = not run
    if created:
        run = tempfile.mkdtemp(prefix="diffembed-test-")
        os.environ["DIFFEMBED_TEST_CACHE"] = run
    run = os.path.realpath(run)
    os.makedirs(run, exist_ok=True)
    for var, rel in HERMETIC_VARS.items():
        # Keep a value already inside the run's directory (the Makefile's); anything else (a user's ~/.cache,
        # a shared HF_HOME) is replaced, never honoured.
        value = os.environ.get(var)
        if not value or os.path.commonpath([run, os.path.realpath(value)]) != run:
            os.environ[var] = os.path.join(run, rel)
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    os.makedirs(os.path.dirname(token), exist_ok=True)
    if not os.path.isfile(token):
        with open(token, "w") as fh:
            fh.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # the token file above is the one Ray uses
    os.environ.pop("RAY_ADDRESS", None)  # ray.init() starts this run's own local Ray, never joins a user's cluster
    return run, created


RUN_DIR, _RUN_DIR_CREATED = _hermetic_environment()

from s3 import configure_environment, s3_bucket, s3_server  # noqa: E402,F401 (fixtures for every test module)

configure_environment(RUN_DIR)  # the loopback S3 endpoint, before anything starts Ray (its workers copy this env)

from hub import configure_hub_environment, hub, hub_server  # noqa: E402,F401

configure_hub_environment()  # the loopback hub's endpoint, before huggingface_hub is imported

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest
import torch

from diffembed.testing.tiny import TINY_FAMILIES, write_tiny_checkpoint

ALL_FAMILIES = (*TINY_FAMILIES, "bert")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])  # field 4, after the "(comm)" field
        except (OSError, ValueError, IndexError):
            break
    return pids


# the standard library's helper processes, which exit by themselves when pytest (their parent) does
STDLIB_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def leftover_processes() -> dict[int, str]:
    """pid -> command line of every process, other than this one and its ancestors (make, the CI script), whose
    environment points into this run's directory: what the tests started and left running."""
    if not os.path.isdir("/proc"):
        return {}
    skip, found = _ancestors(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or another user's
            continue
        if any(helper in cmd for helper in STDLIB_HELPERS):
            continue
        for item in env:
            if item.startswith(b"DIFFEMBED_TEST_CACHE="):
                if os.path.realpath(item.split(b"=", 1)[1].decode(errors="replace")) == RUN_DIR:
                    found[int(entry)] = cmd
                break
    return found


def pytest_sessionfinish(session, exitstatus):
    """Nothing the tests started may outlive them (CI reuses this machine). Ray 2.60's core worker can deadlock
    in its own exit handler (seen once: a `ray::TrainController` whose raylet had gone, blocked in
    `CoreWorkerProcess::HandleAtExit`, forever): whatever is still running a few seconds after the last test is
    killed and named in the summary."""
    import signal
    import time

    deadline = time.monotonic() + 15
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if left and reporter is not None:
        reporter.write_line(f"\nkilled {len(left)} process(es) the tests left running: "
                            + "; ".join(f"{pid} {cmd[:80]}" for pid, cmd in left.items()), yellow=True)


def pytest_unconfigure(config):
    if _RUN_DIR_CREATED:  # the Makefile / CI remove the directory they made
        shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def run_cache_dir() -> Path:
    """This run's cache directory (every variable of HERMETIC_VARS points into it)."""
    return Path(RUN_DIR)


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
