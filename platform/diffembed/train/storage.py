"""Where a run's results live: a local directory or a URI (`file:///abs/dir` now, `s3://bucket/prefix` later).

Every location goes through `pyarrow.fs` (the filesystem layer Ray Train itself uses for `storage_path`), so a
local path and a URI are listed, read and written the same way; `local_path` says when a location is also a plain
directory on this machine (a local path or `file://`), which the Embedder and pathlib can open directly.
"""

from __future__ import annotations

from pathlib import Path

from diffembed.files import is_uri, join, resolve  # one mapping of paths and URIs to filesystems for every job

__all__ = ["filesystem", "is_uri", "join", "list_dirs", "local_path", "normalize", "upload"]


def normalize(location: str) -> str:
    """A URI as given (a trailing slash dropped); a local path made absolute (Ray Train wants absolute paths)."""
    if is_uri(location):
        return location.rstrip("/")
    return str(Path(location).expanduser().resolve())


def local_path(location: str) -> Path | None:
    """The plain directory a location names on this machine, or None for a remote store (s3://, gs://)."""
    if not is_uri(location):
        return Path(location).expanduser()
    if location.startswith("file://"):
        from pyarrow.fs import FileSystem

        return Path(FileSystem.from_uri(location)[1])
    return None


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    return resolve(normalize(location))


def list_dirs(location: str, prefix: str) -> list[tuple[str, float]]:
    """(URI-or-path, mtime) of the directories directly under `location` whose names start with `prefix`;
    [] when `location` does not exist."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = filesystem(location)
    infos = fs.get_file_info(FileSelector(path, allow_not_found=True))
    found = []
    for info in infos:
        if info.type == FileType.Directory and info.base_name.startswith(prefix):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            found.append((join(location, info.base_name), mtime))
    return found


def upload(local_dir: Path, location: str) -> None:
    """Copy a finished local directory to `location` (replacing what was there): written to `<location>.partial`
    first and moved into place, so a failed upload never leaves a half-written directory under the final name.
    Object stores have no directory rename: there the objects are copied server-side from `.partial`, config.json
    last (a loader finds no model before every weight is in place), then `.partial` is deleted."""
    from pyarrow.fs import FileSelector, FileType, copy_files

    fs, path = filesystem(location)
    partial = path + ".partial"
    if fs.get_file_info(partial).type != FileType.NotFound:
        fs.delete_dir(partial)
    fs.create_dir(partial, recursive=True)
    copy_files(str(local_dir), partial, destination_filesystem=fs)
    if fs.get_file_info(path).type != FileType.NotFound:
        fs.delete_dir(path)
    if fs.type_name in ("local", "mock"):
        fs.move(partial, path)
        return
    files = [i.path for i in fs.get_file_info(FileSelector(partial, recursive=True)) if i.type == FileType.File]
    files.sort(key=lambda f: f.endswith("/config.json"))  # config.json last
    for source in files:
        fs.copy_file(source, path + source[len(partial):])
    fs.delete_dir(partial)
