"""What the class ids mean: `classes.json` (names, colours, ignore value), as data folders and checkpoints carry it.

A data folder (or the folder holding A/, A-test/, B/) may hold::

    {"classes": [{"name": "water", "color": "#1f5fbf"},
                 {"name": "urban", "color": "#d62728"}, ...],
     "ignore_index": 255}

Class i is the i-th entry (mask value i); `color` is optional (a fixed palette
fills it in); `ignore_index` (default 255) marks unlabelled mask pixels and must
not be a class id. The first training stores the list in the checkpoint's
samoe.json, so `eval`, the report, the figures and `predict` name and colour the
classes without the data folder; checkpoints whose lists differ are not
compared, and data whose list differs from its checkpoint's is refused. Each
demo-data preset supplies its own list (`DEMO_CLASSES` in stages/data.py,
`HARD_CLASSES` in stages/hard_scenes.py) and writes it as classes.json.
"""

from __future__ import annotations

import colorsys
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upscale.dirfd import Dir
from upscale.errors import DataError, SamoeError

if TYPE_CHECKING:  # numpy is imported where values are converted: inspect and plan start without it
    import numpy as np

from .units import find_beside

CLASSES_JSON = "classes.json"
IGNORE_INDEX = 255  # the ignore value samoe uses inside: masks with another one are remapped to it
MAX_NAME = 64
_TAB20 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
          "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
_NAME = re.compile(r"[^\x00-\x1f\x7f\[\]]+")  # printable, and no rich markup brackets


def default_colors(n: int) -> tuple[str, ...]:
    """Matplotlib's tab20 for the first 20 classes, then evenly spread hues."""
    extra = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.85) for i in range(max(0, n - len(_TAB20)))]
    return (_TAB20 + tuple("#%02x%02x%02x" % tuple(round(255 * c) for c in rgb) for rgb in extra))[:n]


@dataclass(frozen=True)
class ClassList:
    """Class names and colours in id order, and the mask value of unlabelled pixels."""

    names: tuple[str, ...]
    colors: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    @classmethod
    def of(cls, names: tuple[str, ...] | list[str], colors: tuple[str, ...] | None = None,
           ignore_index: int = IGNORE_INDEX) -> "ClassList":
        return cls(tuple(names), tuple(colors) if colors is not None else default_colors(len(names)), ignore_index).checked("classes")

    @classmethod
    def generic(cls, n: int) -> "ClassList":
        """class0..class{n-1}: what a model knows of classes nobody named."""
        return cls.of([f"class{i}" for i in range(n)])

    def checked(self, where: str) -> "ClassList":
        if not 1 <= len(self.names) <= 1024:
            raise SamoeError(f"{where}: {len(self.names)} classes; give between 1 and 1024")
        for name in self.names:
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not _NAME.fullmatch(name):
                raise SamoeError(f"{where}: class name {name!r} must be 1-{MAX_NAME} printable characters without [ ]")
        if len(set(self.names)) != len(self.names):
            dup = next(n for i, n in enumerate(self.names) if n in self.names[:i])
            raise SamoeError(f"{where}: class name {dup!r} appears twice: give each class its own name")
        if len(self.colors) != len(self.names) or not all(isinstance(c, str) and _COLOR.fullmatch(c) for c in self.colors):
            raise SamoeError(f"{where}: colours must be one \"#rrggbb\" per class")
        i = self.ignore_index
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= 65535 or i < len(self.names):
            raise SamoeError(f"{where}: ignore_index {i!r} must be an integer in {len(self.names)}..65535 (not a class id)")
        if i != IGNORE_INDEX and len(self.names) > IGNORE_INDEX:
            raise SamoeError(f"{where}: with more than {IGNORE_INDEX} classes the ignore value must be {IGNORE_INDEX}")
        return self

    def rgb(self) -> np.ndarray:
        """(C, 3) uint8 colours."""
        import numpy as np
        return np.array([[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in self.colors], dtype=np.uint8)

    def to_json(self) -> dict[str, Any]:
        return {"classes": [{"name": n, "color": c} for n, c in zip(self.names, self.colors)], "ignore_index": self.ignore_index}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "ClassList":
        """A class list from classes.json's table (or a checkpoint's copy of it), checked."""
        entries = data.get("classes") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SamoeError(f"{where} must be a table {{\"classes\": [{{\"name\": ..., \"color\": \"#rrggbb\"}}, ...], "
                             "\"ignore_index\": 255}")
        unknown = sorted(set(data) - {"classes", "ignore_index"}) + sorted({k for e in entries for k in e} - {"name", "color", "id"})
        if unknown:
            raise SamoeError(f"{where} has the unknown key {unknown[0]!r}: classes.json holds classes (name, color) and ignore_index")
        for i, e in enumerate(entries):
            if "id" in e and (e["id"] != i or isinstance(e["id"], bool)):
                raise SamoeError(f"{where}: entry {i} has id {e['id']!r}; ids are the entries' positions 0..{len(entries) - 1}, in order")
        names = tuple(e.get("name") for e in entries)
        given = [e.get("color") for e in entries]
        fill = default_colors(len(entries))
        colors = tuple(c if c is not None else fill[i] for i, c in enumerate(given))
        return cls(names, colors, data.get("ignore_index", IGNORE_INDEX)).checked(where)  # type: ignore[arg-type]


def read_classes(folder: Path) -> ClassList | None:
    """The classes.json of a data folder (or of its parent), or None."""
    from upscale.safe_io import load_json

    path = find_beside(folder, CLASSES_JSON)
    if path is None:
        return None
    try:
        return ClassList.from_json(load_json(path, "fix or remove the file", cap=1024**2), str(path))
    except DataError:
        raise
    except SamoeError as e:
        raise DataError(str(e)) from None


def write_classes(folder: Dir, classes: ClassList, token: str | None = None) -> None:
    """Write classes.json atomically into an output folder samoe opened (the caller recorded it), one class per line."""
    lines = ",\n  ".join(json.dumps({"name": n, "color": c}) for n, c in zip(classes.names, classes.colors))
    text = f'{{"classes": [\n  {lines}\n ],\n "ignore_index": {classes.ignore_index}}}\n'
    folder.write_bytes(CLASSES_JSON, text.encode(), token)


def difference(a: ClassList, b: ClassList) -> str | None:
    """The first way two class lists differ, in words (None when they agree)."""
    if len(a.names) != len(b.names):
        return f"{len(a.names)} classes vs {len(b.names)}"
    for i, (x, y) in enumerate(zip(a.names, b.names)):
        if x != y:
            return f"class {i} is {x!r} vs {y!r}"
    if a.ignore_index != b.ignore_index:
        return f"ignore value {a.ignore_index} vs {b.ignore_index}"
    return None


def check_same(a: ClassList | None, b: ClassList | None, a_name: str, b_name: str, fix: str) -> None:
    """Refuse two class lists that differ (a missing list agrees with anything), naming the difference."""
    if a is None or b is None:
        return
    diff = difference(a, b)
    if diff is not None:
        raise SamoeError(f"{a_name} and {b_name} name different classes ({diff}): {fix}")
