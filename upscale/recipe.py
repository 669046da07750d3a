"""Recipes: one TOML file holds a growth plan and each training stage's settings.

    [growth]            # `samoe expand/plan --recipe`: upscale.growth.GrowthRecipe
    experts = 117
    groups = 8
    [train]             # `samoe train --recipe`: the settings of stages.engine.TrainConfig, for every stage
    batch_size = 16
    [train.stage1]      # ... and per stage, over [train]
    lr_scale = 1.0

`--set key=value` overrides one key of the table the command reads (`--set lr=0.01`: this stage's rate),
`--set section.key=value` any key (`--set train.stage2.last_k=2`). Values are read as TOML (`--set augment=true`,
`--set groups=[16,15,15]`); a bare word is a string. The resolved settings are recorded in the lineage of the
checkpoint a command writes, so a checkpoint says how it was made.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .errors import SamoeError

MAX_RECIPE_BYTES = 1024**2


def load_recipe(path: Path | None, overrides: list[str], home: str) -> dict[str, Any]:
    """The recipe at `path` (or an empty one) with every `--set key=value` applied, as nested tables; a key
    without a dot goes to table `home` (dotted, e.g. "train.stage1"), the one the command reads last."""
    recipe: dict[str, Any] = {}
    if path is not None:
        from .dirfd import Dir

        path = Path(path)
        fix = "pass an existing TOML file to --recipe"
        with Dir.open(path.parent, fix) as d:  # a regular file only (never a blocking FIFO), bounded, no link followed
            raw = d.read_bytes(path.name, MAX_RECIPE_BYTES)
        try:
            recipe = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise SamoeError(f"recipe {path} is not valid TOML ({e}): fix the file") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) == 1:
            parts = home.split(".") + parts
        if not sep or not all(parts):
            raise SamoeError(f"--set {item!r} is not section.key=value, e.g. --set lr=0.01 or --set train.stage2.last_k=2")
        table = recipe
        for p in parts[:-1]:
            table = table.setdefault(p, {})
            if not isinstance(table, dict):
                raise SamoeError(f"--set {item!r}: {p} is a value, not a section")
        table[parts[-1]] = _value(text.strip())
    return recipe


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def section(recipe: dict[str, Any], name: str, cls: type, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of table `name` (dotted: "train.stage1") checked against the fields of dataclass `cls`: unknown
    keys (`skip` keys among them: what the command line gives) and values of the wrong type are refused with one
    line naming them. Subtables are left to their own call."""
    table: Any = recipe
    for p in name.split("."):
        table = table.get(p, {}) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise SamoeError(f"{where}: [{name}] must be a table of settings")
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            continue
        if key not in known or key in skip:
            raise SamoeError(f"{where}: unknown key {name}.{key}; known keys: {', '.join(sorted(set(known) - set(skip)))}")
        out[key] = _checked(f"{name}.{key}", value, known[key].type, where)
    return out


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str}


def _checked(key: str, value: Any, annotation: Any, where: str) -> Any:
    """`value` if it fits the field's annotation (ints pass as floats; a list of numbers as a tuple)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    options = [t.strip() for t in text.replace("Optional[", "").rstrip("]").split("|")]
    if value is None and "None" in options:
        return None
    for option in options:
        base = option.split("[")[0]
        if base == "bool" and type(value) is bool:
            return value
        if base == "int" and type(value) is int:
            return value
        if base == "float" and type(value) in (int, float) and math.isfinite(value):
            return float(value)
        if base == "str" and isinstance(value, str):
            return value
        if base in ("list", "tuple") and isinstance(value, list):
            inner = option[option.find("[") + 1 : option.rfind("]")].split(",")[0].strip() if "[" in option else "str"
            kind = _SIMPLE.get(inner, str)
            if all(type(v) is kind or kind is float and type(v) is int for v in value):
                return tuple(value) if base == "tuple" else list(value)
    raise SamoeError(f"{where}: {key} = {value!r} must be {text}")


def defaults(cls: type) -> dict[str, Any]:
    """The default of every field of dataclass `cls` that has one."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out



def resolve(recipe: dict[str, Any], tables: tuple[str, ...], cls: type, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every setting of dataclass `cls` (less `skip`): its default, then each table of `tables` in order over it."""
    out = {k: v for k, v in defaults(cls).items() if k not in skip}
    for name in tables:
        out.update(section(recipe, name, cls, where, skip))
    return out


def lookup(recipe: dict[str, Any], tables: tuple[str, ...], key: str, default: Any) -> Any:
    """`key` from the last of `tables` (dotted names) that sets it, else `default`: one setting without its dataclass."""
    value = default
    for name in tables:
        table: Any = recipe
        for p in name.split("."):
            table = table.get(p, {}) if isinstance(table, dict) else {}
        if isinstance(table, dict) and key in table:
            value = table[key]
    return value


def unknown_tables(recipe: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a top-level table samoe does not read (a typo would otherwise be ignored silently)."""
    for name in recipe:
        if name not in known:
            raise SamoeError(f"{where}: unknown table [{name}]; a recipe has {', '.join(f'[{k}]' for k in known)}")
