"""The mining job's output, written so that a failed run keeps its work.

The mined rows come back to the driver in input order (good-row positions 0, 1, ... N-1). They are written to a
folder beside the output, `<output>.parts/`, in parts of `part_rows` rows: `<start>-<end>.jsonl` holds positions
[start, end) and becomes visible only once whole (a local file is written under a temporary name and renamed; an
object store shows an upload when it is closed). `<start>-<end>.json` beside it, written after the part, holds the
part's totals and marks it complete. `job.json` names the run the parts belong to (a digest of everything that
decides the rows: the embedding function and model, candidates, negatives, the input).

A rerun of the same job keeps the complete parts that run on from position 0 and mines from where they end; parts of
another job (changed settings or input) are removed first. When every row is written, the parts are joined into
`output` (written whole under its own name, then renamed locally) and the folder is removed: the output appears
whole or not at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PART = re.compile(r"^(\d{12})-(\d{12})\.(jsonl|json)$")
COPY_BYTES = 8 << 20


@dataclass
class Part:
    start: int
    end: int
    totals: dict[str, Any]


class PartsOutput:
    """Parts of the output under `<output>.parts/`; see the module docstring."""

    def __init__(self, output: str, job: str, part_rows: int, total: int):
        from diffembed.files import is_uri, resolve

        self.remote = is_uri(output)
        self.fs, self.final = resolve(output)
        self.folder = f"{self.final}.parts"
        self.job, self.part_rows, self.total = job, part_rows, total
        self.parts: list[Part] = []
        self._stream = None
        self._start = self._end = self._rows = 0
        self._totals: dict[str, Any] = {}
        self._tmp = ""

    # ---------------------------------------------------------------------------------------------- resuming

    def resume(self) -> int:
        """Keep the complete parts of this job that run on from position 0 (everything else in the folder is
        removed); returns the number of rows they hold: the position mining starts from."""
        import pyarrow.fs as pafs

        if not self.remote:
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
        info = self.fs.get_file_info(self.folder)
        if info.type == pafs.FileType.NotFound:
            self._new_folder()
            return 0
        names = {i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.folder))}
        job = self._read_json("job.json") if "job.json" in names else None
        if not job or job != {"job": self.job, "part_rows": self.part_rows, "rows": self.total}:
            n = sum(1 for name in names if PART.match(name))
            if n:
                log.warning("%s: removing %d part file(s) of an earlier run with other settings or input",
                            self.folder, n)
            self.fs.delete_dir(self.folder)
            self._new_folder()
            return 0
        ranges = {}
        for name in names:
            match = PART.match(name)
            if match and match.group(3) == "json" and f"{match.group(1)}-{match.group(2)}.jsonl" in names:
                ranges[int(match.group(1))] = int(match.group(2))
        kept, position = [], 0
        while position in ranges:  # a chain from 0: each part starts where the one before ends
            end = ranges[position]
            totals = self._read_json(self._name(position, end, "json"))
            if totals is None:
                break
            kept.append(Part(position, end, totals))
            position = end
        keep = {self._name(p.start, p.end, suffix) for p in kept for suffix in ("jsonl", "json")} | {"job.json"}
        for name in sorted(names - keep):  # a torn part, a temporary file of a killed run, a part past a gap
            self.fs.delete_file(f"{self.folder}/{name}")
        self.parts = kept
        if position:
            log.warning("%s: resuming after %d row(s) written by an earlier run", self.folder, position)
        return position

    def _new_folder(self) -> None:
        self.fs.create_dir(self.folder, recursive=True)
        self._write_json("job.json", {"job": self.job, "part_rows": self.part_rows, "rows": self.total})

    # ---------------------------------------------------------------------------------------------- writing

    def write(self, positions: list[int], lines: list[str], totals: dict[str, Any]) -> None:
        """Rows at `positions` (consecutive, from where the last write ended) with their per-row `totals` summed
        into the part they fall in: a part is committed as soon as its last row is written. Parts end at multiples
        of `part_rows` and at the last row, so a part's name is known when it is opened."""
        for i, (position, line) in enumerate(zip(positions, lines)):
            expected = self._start + self._rows if self._stream is not None else self.end
            if position != expected:
                raise RuntimeError(f"mined rows out of order: position {position}, expected {expected}")
            if self._stream is None:
                self._open(position)
            self._stream.write(line.encode() + b"\n")
            self._rows += 1
            for key, value in totals.items():  # per-row values
                self._totals[key] = self._totals.get(key, 0) + value[i]
            if self._start + self._rows == self._end:
                self._commit()

    @property
    def end(self) -> int:
        return self.parts[-1].end if self.parts else 0

    def _open(self, start: int) -> None:
        if start >= self.total:
            raise RuntimeError(f"mined row at position {start}, but the input has {self.total} rows")
        self._start, self._rows, self._totals = start, 0, {}
        self._end = min((start // self.part_rows + 1) * self.part_rows, self.total)
        if self.remote:  # an object appears when its upload is closed: whole or not at all
            self._tmp = ""
            self._stream = self.fs.open_output_stream(f"{self.folder}/{self._name(start, self._end, 'jsonl')}")
        else:
            self._tmp = f"{self.folder}/.{uuid.uuid4().hex}.tmp"
            self._stream = self.fs.open_output_stream(self._tmp)

    def _commit(self) -> None:
        end = self._end
        self._stream.close()
        self._stream = None
        if not self.remote:
            self.fs.move(self._tmp, f"{self.folder}/{self._name(self._start, end, 'jsonl')}")
        totals = {k: (float(v) if isinstance(v, float) else int(v)) for k, v in self._totals.items()}
        self._write_json(self._name(self._start, end, "json"), totals)  # written last: the part is complete
        self.parts.append(Part(self._start, end, totals))

    def totals(self) -> dict[str, Any]:
        """Every complete part's totals summed (this run's and the earlier runs' it resumed)."""
        out: dict[str, Any] = {}
        for part in self.parts:
            for key, value in part.totals.items():
                out[key] = out.get(key, 0) + value
        return out

    def join(self) -> None:
        """The parts, in order, become `output` (whole or not at all); the folder goes."""
        if self.end != self.total:
            raise RuntimeError(f"{self.end} of {self.total} mined rows written")
        target = self.final if self.remote else f"{self.final}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open_output_stream(target) as out:
                for part in self.parts:
                    with self.fs.open_input_stream(f"{self.folder}/{self._name(part.start, part.end, 'jsonl')}") as f:
                        while chunk := f.read(COPY_BYTES):
                            out.write(chunk)
        except BaseException:
            if not self.remote:
                self._delete_quietly(target)
            raise
        if not self.remote:
            os.replace(target, self.final)
        self.fs.delete_dir(self.folder)

    def abort(self) -> None:
        """A failed run: the part being written is dropped, the complete ones stay for a rerun (no folder is left
        when there are none)."""
        if self._stream is not None:
            self._close_quietly()  # an object store: the upload completes under a name a rerun removes
            self._stream = None
            # a local temporary file, or an upload that completed as it closed: without its .json it is no part
            self._delete_quietly(self._tmp or f"{self.folder}/{self._name(self._start, self._end, 'jsonl')}")
        if not self.parts:
            self.fs.delete_dir(self.folder)

    # ---------------------------------------------------------------------------------------------- files

    @staticmethod
    def _name(start: int, end: int, suffix: str) -> str:
        return f"{start:012d}-{end:012d}.{suffix}"

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        data = json.dumps(value).encode()
        if self.remote:
            with self.fs.open_output_stream(f"{self.folder}/{name}") as f:
                f.write(data)
            return
        tmp = f"{self.folder}/.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{self.folder}/{name}")

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(f"{self.folder}/{name}") as f:
                value = json.loads(f.read().decode())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _close_quietly(self) -> None:
        try:
            self._stream.close()
        except OSError:
            pass

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:
            pass
