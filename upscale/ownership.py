"""Who may replace or write an output directory: ownership, input overlap, one job per output.

Every samoe command that writes a directory goes through this module, so the rules
live in one place:

* **Ownership.** `--force` deletes only what samoe wrote: a directory holding the
  marker `.samoe-owner.json` (written by demo-data, train, pseudo-label) or a
  format's own file (a checkpoint's `samoe.json`, a run directory's `run.json`,
  demo data's `demo-data.json`), or an empty directory. A user's folder, a
  regular file or a symlink is refused, with or without `--force`.
* **Never its own input.** An output that is, contains or lies inside one of the
  command's inputs is refused before anything is deleted or written.
* **One job per output.** An exclusive `flock` (the `filelock` package) on
  `.NAME.lock` beside the output, held for the whole command; the holder's pid
  is written to `.NAME.lock.pid` (flock records none) so a second job can name
  it. The kernel drops the lock when its process dies, even by `kill -9`, so a
  stale lock file never blocks.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from .errors import SamoeError

OWNER_FILE = ".samoe-owner.json"


def write_marker(directory: Path, command: str) -> None:
    """Mark `directory` as written by `samoe COMMAND` (atomic: a reader sees no marker or a whole one)."""
    from . import __version__

    path = Path(directory) / OWNER_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"written_by": f"samoe {command}", "command": command, "samoe": __version__}) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1024**2:
            return None
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def owner(directory: Path) -> str | None:
    """The samoe command that wrote `directory` ("checkpoint" / "train" for format files), or None."""
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return None
    marker = _read_json(d / OWNER_FILE)
    if marker is not None and isinstance(marker.get("command"), str):
        return marker["command"]
    meta = _read_json(d / "samoe.json")
    if meta is not None and meta.get("format") == "samoe-checkpoint":
        return "checkpoint"
    run = _read_json(d / "run.json")
    if run is not None and "identity" in run:
        return "train"
    demo = _read_json(d / "demo-data.json")  # demo data written before the marker existed
    if demo is not None and "counts" in demo:
        return "demo-data"
    return None


def is_empty_dir(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def check_replaceable(path: Path, force: bool, option: str = "--out") -> None:
    """Allow writing to `path` only if it does not exist, or `force` is given and samoe owns it.

    Call before deleting or replacing anything at `path`.
    """
    p = Path(path)
    if not (p.exists() or p.is_symlink()):
        return
    if not force:
        raise SamoeError(f"{p} already exists: choose another {option} or pass --force to replace it")
    if p.is_symlink() or not p.is_dir():
        raise SamoeError(f"{p} is not a directory samoe wrote: refusing to replace it even with --force; choose another {option}")
    if not is_empty_dir(p) and owner(p) is None:
        raise SamoeError(f"{p} was not written by samoe (no {OWNER_FILE} or samoe.json): refusing to delete it even "
                         f"with --force; choose another {option}")


def check_separate(out: Path, option: str, inputs: Mapping[str, Path | str | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs.

    Replacing such an output would delete (or write into) the very files the command reads.
    """
    o = Path(out).resolve()
    for name, value in inputs.items():
        if value is None:
            continue
        i = Path(value).resolve()
        if o == i or i in o.parents or o in i.parents:
            raise SamoeError(f"{option} {out} overlaps {name} {value} (the same folder, or one inside the other): "
                             f"choose a separate {option}")


def lock_paths(path: Path) -> tuple[Path, Path]:
    """The lock file beside `path` and the sidecar holding its holder's pid."""
    p = Path(path).resolve()
    lock = p.parent / f".{p.name}.lock"
    return lock, lock.with_name(lock.name + ".pid")


@contextmanager
def exclusive(path: Path, option: str = "--out") -> Iterator[None]:
    """Hold the one-job lock of output `path` for the body; a second job fails at once naming the holder."""
    from filelock import FileLock, Timeout

    lock_path, pid_path = lock_paths(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            pid = pid_path.read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise SamoeError(f"{path} is in use by another samoe job (pid {pid}): wait for it to finish, "
                         f"or choose another {option}") from None
    try:
        tmp = pid_path.with_name(f".{pid_path.name}.tmp-{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, pid_path)
        yield
    finally:
        # Unlink while still holding: a waiter that opened the old inode sees it unlinked and retries.
        pid_path.unlink(missing_ok=True)
        lock_path.unlink(missing_ok=True)
        lock.release()
