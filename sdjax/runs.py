"""The files of resumable runs: atomic writes, append-only JSONL ledgers and run fingerprints.

A run may be killed at any instant and restarted into the same folder, so every file it leaves must
be one a restart can trust: a whole old version or a whole new one (atomic writes), every finished
record of a ledger and at most a torn last line (appends of whole lines, fsynced), and a refusal
when the restart's settings differ from those the folder was made with (fingerprints).

Imports nothing of sdjax and no jax, so anything may use it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Mapping, Optional

from absl import logging


# --- atomic writes ---------------------------------------------------------------------------------

def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` so that a reader, or a restart after a crash, finds the
    old file or the new one, never a part. The temporary file is unique (mkstemp), so processes
    writing the same path on a shared disk do not collide, and it is removed whatever goes wrong."""
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide shared outputs from their other users
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_json_atomically(path: str | os.PathLike, value: Any, *, indent: int = 2,
                          sort_keys: bool = False) -> None:
    """`value` as JSON, written atomically; serialized first, so a value that cannot be written
    leaves the old file untouched."""
    write_atomically(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


# --- JSONL ledgers ---------------------------------------------------------------------------------

def append_jsonl(path: str | os.PathLike, *records: Any) -> None:
    """Append one line per record in a single O_APPEND write, fsynced: once this returns, a crash
    loses none of them, and a crash during it leaves at most a torn last line (which `read_jsonl`
    skips and `repair_jsonl` removes). Nothing to append leaves the file as it is."""
    if not records:
        return
    data = "".join(json.dumps(record) + "\n" for record in records).encode("utf-8")
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl_atomically(path: str | os.PathLike, records: Any) -> None:
    """Replace a ledger as a whole (one line per record), for when records change after the fact."""
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def read_jsonl(path: str | os.PathLike) -> list:
    """The records of a ledger; none when the file does not exist yet. An unreadable last line is
    what a crash mid-append leaves: it is skipped with a warning. An unreadable line before the
    last is damage no append makes, so it is an error naming the file and line."""
    records, _, torn = _parse_jsonl(os.fspath(path))
    if torn is not None:
        logging.warning("%s:%d: torn last line skipped (a run stopped while appending it?)",
                        os.fspath(path), torn)
    return records


def repair_jsonl(path: str | os.PathLike) -> None:
    """Make a ledger safe to append to after a crash: a torn last line is cut off and a whole last
    record that lacks only its newline gets one, so the next append starts a line of its own
    instead of gluing onto the last (which would put a corrupt line in the middle)."""
    path = os.fspath(path)
    _, end, torn = _parse_jsonl(path)
    if torn is not None:
        logging.warning("%s:%d: torn last line removed (a run stopped while appending it?)", path,
                        torn)
        os.truncate(path, end)
    elif os.path.exists(path) and end < os.path.getsize(path):
        with open(path, "ab") as f:
            f.write(b"\n")


def _parse_jsonl(path: str) -> tuple[list, int, Optional[int]]:
    """(records, offset just past the last good newline-ended line, number of a torn last line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0, None
    *complete, tail = data.split(b"\n")  # tail: what follows the last newline, normally nothing
    records, end = [], 0
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                if number == len(complete) and not tail.strip():
                    return records, end, number
                raise ValueError(f"{path}:{number}: not a JSON record ({err}); only the last line "
                                 f"of a ledger can be torn, so the file is damaged") from None
        end += len(line) + 1
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except ValueError:
            return records, end, len(complete) + 1
    return records, end, None


# --- fingerprints ----------------------------------------------------------------------------------

def check_fingerprint(path: str | os.PathLike, fingerprint: Mapping[str, Any], what: str, *,
                      remedy: str, record: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse to resume into a folder made with other settings, then store this run's at `path`.

    `fingerprint` holds what the outputs depend on; a restart whose values differ from those
    stored raises ValueError naming each changed field, before and after, as "<path>: <what> made
    with other settings (<field>: <before> -> <after>); <remedy>". A field the stored file lacks is
    not compared, so folders written before a field was added stay resumable. `record` (default:
    the fingerprint) is what gets stored; it must include the fingerprint's fields, and may hold
    more, such as a whole resolved config.
    """
    path = os.fspath(path)
    fingerprint = json.loads(json.dumps(dict(fingerprint)))  # compared as stored: tuples are lists
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
        except ValueError as err:
            raise ValueError(f"{path}: unreadable ({err}); {remedy}") from None
        changed = [(name, stored[name], value) for name, value in fingerprint.items()
                   if name in stored and stored[name] != value]
        if changed:
            detail = ", ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changed)
            raise ValueError(f"{path}: {what} made with other settings ({detail}); {remedy}")
    write_json_atomically(path, fingerprint if record is None else dict(record))


def file_sha256(path: str | os.PathLike, *, tensors_only: bool = False) -> str:
    """The sha256 (hex) of a file's contents, read once per process while its size and
    modification time stay the same. `tensors_only`: for a `.safetensors` file, of the bytes after
    its header (the WebUI's "addnet" hash, blind to metadata edits)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return _file_sha256(real, stat.st_mtime_ns, stat.st_size, tensors_only)


@functools.lru_cache(maxsize=1024)
def _file_sha256(path: str, mtime_ns: int, size: int, tensors_only: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if tensors_only and path.endswith(".safetensors"):
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
