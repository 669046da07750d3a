"""Decoding what samoe reads from checkpoint and run directories, as hostile input.

Checkpoints and run directories live on shared file systems and are handed
between users, so every file in them may be damaged or crafted. Files are
opened by `upscale.dirfd.Dir` (relative to their directory, never through a
link, regular files only, bounded by a cap); this module decodes what was read:
JSON strictly (UTF-8, no NaN or Infinity, no duplicate keys, no runaway
nesting), and names checked to be one plain path component.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 1024**2  # samoe.json of a 10B model is ~1 MB; index ~0.2 MB


def plain_name(name: Any) -> bool:
    """One path component: no separators, no `.`/`..`, no NUL, not absolute."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name
            and name not in (".", "..") and "\0" not in name)


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


def json_error(e: BaseException) -> str:
    """Why `parse_json` refused a document, in a few words."""
    why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "nested too deeply" if isinstance(e, RecursionError) else str(e)
    return why[:120]


def load_json(path: Path, fix: str, cap: int = MAX_JSON_BYTES) -> Any:
    """A JSON document from file `path` of an input folder (classes.json, data.json): its last component is
    opened without following a link or blocking on a FIFO (upscale.dirfd), at most `cap` bytes."""
    from .dirfd import Dir

    path = Path(path)
    with Dir.open(path.parent, fix) as d:
        return d.read_json(path.name, cap)
