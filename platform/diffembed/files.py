"""Input files shared by every job: paths and URIs (`s3://`, `gs://`, `file://`, any pyarrow filesystem) expanded
and checked before anything starts, one opener for all of them, and JSON Lines read with their line numbers, so
every reader reports a bad line as `file:line`.

A URI stays a URI (with its scheme and `?query`) all the way to Ray Data and our readers: only `resolve` turns it
into a (pyarrow filesystem, path) pair, so that mapping lives in one place.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable, Iterator

from diffembed.config import ConfigError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

GLOB_CHARS = "*?["


def is_uri(path: str) -> bool:
    return "://" in path


def _reason(exc: BaseException) -> str:
    """The first line of a pyarrow/OS error, without its C++ location noise."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def resolve(path: str) -> tuple["pafs.FileSystem", str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow knows; a bad URI is a ConfigError."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    try:
        return pafs.FileSystem.from_uri(path)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError: unknown scheme, unparsable URI, no bucket
        raise ConfigError(f"cannot open {path!r}: {_reason(exc)}") from None


def open_input(path: str) -> IO[bytes]:
    """A seekable binary file with `readline`, local or any URI (pyarrow's own files have no readline)."""
    if not is_uri(path):
        return open(os.path.expanduser(path), "rb")
    fs, inner = resolve(path)
    try:
        return io.BufferedReader(fs.open_input_file(inner))
    except OSError as exc:  # still an OSError (readers catch those), one line instead of pyarrow's context
        raise OSError(f"cannot read {path}: {_reason(exc)}") from None


def file_size(path: str) -> int:
    if not is_uri(path):
        return os.path.getsize(os.path.expanduser(path))
    fs, inner = resolve(path)
    try:
        info = fs.get_file_info(inner)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {_reason(exc)}") from None
    if info.size is None:
        raise ConfigError(f"input is not a readable file: {path}")
    return info.size


def _uri_type(uri: str):
    fs, inner = resolve(uri)
    try:
        return fs.get_file_info(inner).type
    except OSError as exc:
        raise ConfigError(f"cannot read {uri!r}: {_reason(exc)}") from None


def is_dir(path: str) -> bool:
    """Whether a path or URI names a folder (on object stores: a key prefix with objects under it)."""
    if not is_uri(path):
        return Path(path).expanduser().is_dir()
    import pyarrow.fs as pafs

    return _uri_type(path) == pafs.FileType.Directory


def is_file(path: str) -> bool:
    if not is_uri(path):
        return Path(path).expanduser().is_file()
    import pyarrow.fs as pafs

    return _uri_type(path) == pafs.FileType.File


def join(root: str, *parts: str) -> str:
    """A path inside a folder given as a local path or a URI (a URI's `?query` stays at the end)."""
    if not is_uri(root):
        return str(Path(root, *parts))
    base, sep, query = root.partition("?")
    return base.rstrip("/") + "/" + "/".join(parts) + sep + query


def list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Every file under a folder (path or URI, recursively) whose name ends in one of `suffixes`, sorted."""
    if not is_uri(folder):
        root = Path(folder).expanduser()
        return sorted(str(p) for p in root.rglob("*") if p.suffix in suffixes and p.is_file())
    import pyarrow.fs as pafs

    fs, inner = resolve(folder)
    prefix, query = _uri_parts(folder, inner)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=True))
    except OSError as exc:
        raise ConfigError(f"cannot list {folder!r}: {_reason(exc)}") from None
    found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)]
    return [prefix + p + query for p in sorted(found)]


def _uri_parts(uri: str, inner: str) -> tuple[str, str]:
    """(prefix, query) with `uri == prefix + inner + query` for the filesystem path `inner` of `uri`, so paths
    found by listing are turned back into URIs of the same filesystem (`s3://` + `bucket/key`, `file://` + `/p`)."""
    base, sep, query = uri.partition("?")
    query = sep + query
    if inner and base.endswith(inner):
        return base[: len(base) - len(inner)], query
    scheme, _, rest = base.partition("://")  # inner was decoded (%20): keep scheme and authority as given
    authority = rest.split("/", 1)[0]
    return f"{scheme}://" + (authority if inner.startswith("/") else ""), query


def _resolve_for(uri: str, what: str) -> tuple["pafs.FileSystem", str]:
    try:
        return resolve(uri)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _expand_uri(pattern: str, what: str, folders: bool) -> list[str]:
    """A URI, or a URI whose path has glob characters, as the sorted URIs of what it names (files, and folders
    if `folders`).

    Glob components match one path component each (like `glob.glob`: `*` never crosses a `/`); the listing
    starts at the last folder before the first glob character, so only that part of a bucket is listed.
    """
    import pyarrow.fs as pafs

    base_uri, sep, query = pattern.partition("?")
    scheme, _, rest = base_uri.partition("://")
    parts = rest.split("/")
    first_glob = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
    if first_glob is None:
        fs, inner = _resolve_for(pattern, what)
        try:
            info = fs.get_file_info(inner)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {pattern!r}: {_reason(exc)}") from None
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"{what}: no file matches {pattern!r}")
        if info.type != pafs.FileType.File and not folders:
            raise ConfigError(f"{what}: input is not a readable file: {pattern}")
        return [pattern]
    if first_glob == 0:
        raise ConfigError(f"{what}: {pattern!r}: a glob must not be in the bucket or host name")
    root_uri = f"{scheme}://" + "/".join(parts[:first_glob]) + sep + query
    fs, root = _resolve_for(root_uri, what)
    prefix, query = _uri_parts(root_uri, root)
    wanted = [part for part in parts[first_glob:] if part]  # a trailing "/" adds nothing
    try:
        infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=len(wanted) > 1, allow_not_found=True))
    except OSError as exc:
        raise ConfigError(f"{what}: cannot list {root_uri!r}: {_reason(exc)}") from None
    matches = []
    for info in infos:
        if info.type != pafs.FileType.File and not folders:
            continue
        relative = info.path[len(root.rstrip("/")) :].strip("/").split("/")
        if len(relative) == len(wanted) and all(fnmatch.fnmatchcase(r, w) for r, w in zip(relative, wanted)):
            matches.append(prefix + info.path + query)
    if not matches:
        raise ConfigError(f"{what}: no file matches {pattern!r}")
    return sorted(matches)


def expand_files(patterns: list[str], what: str, *, folders: bool = True) -> list[str]:
    """Globs over local paths and URIs expanded (sorted per pattern, each must match); URIs stay URIs.

    Folders are returned as they are (the caller decides what a folder means), or with `folders=False` left out
    of glob matches and refused when named (the listing already knows each entry's type: no extra request per
    file). A missing or unreadable URI is a ConfigError of one line, raised here rather than late in a Ray task.
    """
    files: list[str] = []
    for pattern in patterns:
        if is_uri(pattern):
            files.extend(_expand_uri(pattern, what, folders))
            continue
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not folders:
            if len(matches) == 1 and not any(c in pattern for c in GLOB_CHARS) and not os.path.isfile(matches[0]):
                raise ConfigError(f"{what}: input is not a readable file: {matches[0]}")
            matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"{what}: no file matches {pattern!r}")
        files.extend(matches)
    if not files:
        raise ConfigError(f"{what}: no input files given")
    return files


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for every non-blank line; a line that is not JSON yields a
    `ValueError("malformed JSON line (...)")` in place of the value, so the caller decides: skip, count or fail."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"malformed JSON line ({exc.msg})")


def utf8_lines(raw_lines: Iterable[bytes]) -> Iterator[str]:
    """Byte lines (split at b"\\n" only) as text, undecodable bytes replaced, so a bad line is still reported by
    number. Not `str.splitlines`: it also breaks at U+2028, U+0085 and others, which JSON strings may hold raw."""
    for raw in raw_lines:
        yield raw.decode("utf-8", errors="replace")


def plan_ranges(files: list[str], block_bytes: int) -> list[dict[str, Any]]:
    """Byte ranges of at most `block_bytes` over every file, in file order (an empty file: no range)."""
    ranges = []
    for index, path in enumerate(files):
        size = file_size(path)
        for start in range(0, size, block_bytes):
            ranges.append({"path": path, "file": index, "start": start, "end": min(start + block_bytes, size)})
    return ranges


def iter_range_lines(path: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line bytes) of the lines that start in [start, end): every line of a file belongs to exactly
    one of its ranges, whatever their size."""
    with open_input(path) as f:
        pos = start
        if start > 0:  # the line running into this range belongs to the previous one
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
        else:
            f.seek(0)
        while pos < end:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def line_number(path: str, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset` (counted only when a report needs it)."""
    count, done = 1, 0
    with open_input(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count
