"""Reading files of checkpoint and run directories as hostile input.

Checkpoints and run directories live on shared file systems and are handed
between users, so every file in them may be damaged or crafted. The rules here:
open only regular files that lie inside the directory (a name is one plain path
component; a symbolic link must resolve inside the directory), bound every read
by the file's size and by a cap, and decode JSON strictly (UTF-8, no NaN or
Infinity, no duplicate keys, no runaway nesting). Every failure is a
`SamoeError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import SamoeError

MAX_JSON_BYTES = 64 * 1024**2  # samoe.json of a 10B model is ~1 MB; index ~0.2 MB


def plain_name(name: Any) -> bool:
    """One path component: no separators, no `.`/`..`, no NUL, not absolute."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name
            and name not in (".", "..") and "\0" not in name)


def file_inside(root: Path, name: str, what: str, fix: str) -> Path:
    """`root/name` if it is a regular file inside `root` (a link may point only inside `root`)."""
    if not plain_name(name):
        raise SamoeError(f"{what} names {name!r}, which is not a plain file name inside {root}: {fix}")
    path = root / name
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            target = path.resolve(strict=True)
            if target.parent != root.resolve():
                raise SamoeError(f"{path} is a link to {target}, outside {root}: samoe reads only files inside the directory; {fix}")
            st = os.stat(target)
    except FileNotFoundError:
        raise SamoeError(f"{path} is missing: {fix}") from None
    except (OSError, RuntimeError) as e:  # link loops, permissions
        raise SamoeError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SamoeError(f"{path} is not a regular file: {fix}")
    return path


def read_bounded(path: Path, cap: int, fix: str) -> bytes:
    """At most `cap` bytes of a regular file; a larger file is refused before it is read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SamoeError(f"{path} is not a regular file: {fix}")
            if st.st_size > cap:
                raise SamoeError(f"{path} is {st.st_size} bytes, more than the {cap} samoe reads from such a file: {fix}")
            return f.read(cap + 1)[:cap]
    except OSError as e:
        raise SamoeError(f"cannot read {path} ({e.strerror}): {fix}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """Strict JSON from bytes; raises ValueError (UnicodeDecodeError, JSONDecodeError included) or RecursionError."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def load_json(path: Path, fix: str, cap: int = MAX_JSON_BYTES) -> Any:
    """A JSON document from a regular file of at most `cap` bytes."""
    data = read_bounded(path, cap, fix)
    try:
        return parse_json(data)
    except (ValueError, RecursionError) as e:
        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise SamoeError(f"{path} is not valid JSON ({why[:120]}): {fix}") from None
