"""Files every stage writes and reads: atomic writes (temp file, then rename), JSON and JSONL, and the one SQLite
integrity check (Prefect's and MLflow's local databases)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.log import PipelineError, shown

# mkstemp/mkdtemp create 0600/0700 entries; outputs get the permissions any other file here would (the umask).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def _writable(path: Path) -> Iterator[None]:
    """An OS error while writing an output is the user's to fix (permissions, full disk): say which path."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                           errno.EEXIST):
            raise
        raise PipelineError(f"cannot write {shown(path)}: {e.strerror} (make its folder writable, free space, "
                            "or point paths.* in params.yaml elsewhere)") from None


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write to a temp file beside `path`, then rename: a crash leaves the previous file intact."""
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Fill a staging folder beside `out`, then swap it in whole: a crash leaves the previous folder intact."""
    out = Path(out)
    with _writable(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, 0o777 & ~_UMASK)
    try:
        yield staging
        follow_umask(staging)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def follow_umask(folder: str | Path) -> None:
    """Give everything under `folder` the mode a new file or folder gets from the umask: libraries write 0600 files
    (safetensors 0.8 does), and an output, a checkpoint too, gets the permissions any other file here would."""
    for entry in Path(folder).rglob("*"):
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~_UMASK)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Stream rows (any iterable, a generator too) into a temp file, then rename; returns how many were written."""
    path = Path(path)
    n = 0
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a line that is not a JSON object stops the run naming the file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """`read_jsonl` one row at a time (a corpus of any size in flat memory); a missing file fails at once."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{shown(path)} does not exist: run the stage that writes it first (dvc repro)")
    return _rows(path)


def _rows(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as e:
                raise PipelineError(f"{shown(path)}:{number}: not UTF-8 text (byte {e.start + 1}); "
                                    "fix or delete that line, or rerun the stage that writes the file") from None
            except json.JSONDecodeError as e:
                raise PipelineError(f"{shown(path)}:{number}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                                    "fix or delete that line, or rerun the stage that writes the file") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{shown(path)}:{number}: expected a JSON object, got {type(row).__name__}; "
                                    "fix or delete that line, or rerun the stage that writes the file")
            yield row


def sqlite_problem(db: str | Path, timeout: float = 30) -> str | None:
    """What is wrong with a SQLite database file (`PRAGMA quick_check`'s finding or the error opening it), or None
    when it is sound. Read-only: a file a server has open is not disturbed."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout) as con:
            result = con.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        return str(e)
    return None if result == "ok" else result
