"""Repository invariants that, broken, break every install."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_a_source_root_not_a_package():
    # platform/__init__.py would shadow the stdlib module `platform` and break torch and ray.
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "diffembed" / "__init__.py").is_file()


def test_stdlib_platform_still_importable():
    import platform

    assert callable(platform.system)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
