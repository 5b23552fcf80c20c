"""The test run is hermetic: every cache lives in a directory made for this run, never under the user's home, and
the Ray workers of the session cluster see the same directories as the driver."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from conftest import HERMETIC_VARS, RUN_DIR, leftover_processes

HOMES = {Path(p).resolve() for p in (os.path.expanduser("~"), pwd.getpwuid(os.getuid()).pw_dir)}


def _inside(path: str | Path, parent: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(parent).resolve())


def test_the_run_directory_is_a_fresh_temp_dir_outside_home():
    run = Path(RUN_DIR)
    assert run.is_dir() and os.environ["DIFFEMBED_TEST_CACHE"] == str(run)
    assert not any(_inside(run, home) for home in HOMES), f"{run} is under the user's home"
    assert ".cache" not in run.parts


@pytest.mark.parametrize("var", sorted(HERMETIC_VARS))
def test_cache_variables_point_into_the_run_directory(var):
    assert _inside(os.environ[var], RUN_DIR), f"{var}={os.environ.get(var)} is outside {RUN_DIR}"
    assert not any(_inside(os.environ[var], home) for home in HOMES)


def test_libraries_read_the_run_directory():
    # Values libraries compute once at import: conftest set the variables before any of them was imported.
    import huggingface_hub.constants as hf

    assert os.environ.get("HF_HUB_OFFLINE") == "1" and hf.HF_HUB_OFFLINE
    assert _inside(hf.HF_HOME, RUN_DIR) and _inside(hf.HF_HUB_CACHE, RUN_DIR)
    assert _inside(hf.HF_TOKEN_PATH, RUN_DIR)  # no user token is read either
    assert Path(os.environ["RAY_AUTH_TOKEN_PATH"]).is_file()


def test_tiny_checkpoints_resolve_in_the_run_directory():
    from diffembed.models.loading import resolve_model_path

    path = resolve_model_path("tiny:dream")
    assert path == Path(os.environ["DIFFEMBED_CACHE"]) / "tiny" / "dream"
    assert _inside(path, RUN_DIR) and (path / "config.json").is_file() and (path / ".complete").is_file()


def test_ray_workers_see_the_drivers_directories(ray_cluster):
    import ray

    names = (*HERMETIC_VARS, "DIFFEMBED_TEST_CACHE", "HF_HUB_OFFLINE")

    @ray.remote
    def worker_env() -> tuple[dict[str, str | None], str]:
        from diffembed.models.loading import resolve_model_path

        return {var: os.environ.get(var) for var in names}, str(resolve_model_path("tiny:dream"))

    from diffembed.models.loading import resolve_model_path

    env, tiny = ray.get(worker_env.remote(), timeout=300)
    assert env == {var: os.environ.get(var) for var in names}
    assert tiny == str(resolve_model_path("tiny:dream"))


def test_leftover_processes_finds_what_the_run_started_and_nothing_else():
    """The session's last step kills what the tests left running (`pytest_sessionfinish`): it must find a
    process that carries this run's directory, and never this process, its parents, or another run's."""
    import subprocess
    import sys

    code = "import time; time.sleep(60)"
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()  # the stdlib's helper: it goes when pytest goes
    ours = subprocess.Popen([sys.executable, "-c", code])
    other = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "DIFFEMBED_TEST_CACHE": "/elsewhere"})
    try:
        left = leftover_processes()
        assert ours.pid in left and "time.sleep(60)" in left[ours.pid]
        assert other.pid not in left and os.getpid() not in left and os.getppid() not in left
        assert not any("resource_tracker" in cmd for cmd in left.values()), left
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
    assert ours.pid not in leftover_processes()
