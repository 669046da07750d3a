"""What a checkpoint knows about its data: units, polarisations, classes, resolution (samoe.json's "data").

Training writes it (`samoe train`, from its --data folder and options) and it
follows the checkpoint through expand and later stages; `eval`, `pseudo-label`
and `predict` read it so that new data is converted, named and scored the way
the training data was. The record is part of a checkpoint, so it is untrusted
input: every field is checked when read.

    "data": {"input_scale": "db", "dn_calibration": null, "polarisations": ["VV", "VH"],
             "classes": {"classes": [{"name": "water", "color": "#1f5fbf"}, ...], "ignore_index": 255} | null,
             "resize": false}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upscale.errors import SamoeError

from .classes import ClassList
from .units import Units

DATA_KEY = "data"


@dataclass(frozen=True)
class DataSpec:
    """Units, classes (None: never named) and whether scenes were resized to the model's size (`--resize`)."""

    units: Units
    classes: ClassList | None = None
    resize: bool = False

    def to_record(self) -> dict[str, Any]:
        return {**self.units.to_json(), "classes": self.classes.to_json() if self.classes is not None else None,
                "resize": self.resize}


def recorded(meta: dict[str, Any], where: str) -> DataSpec | None:
    """The data record of a checkpoint's samoe.json (`where` names it in errors), or None for one never trained."""
    record = meta.get(DATA_KEY)
    if record is None:
        return None
    fix = f"{where}: the \"data\" record is damaged; re-create the checkpoint or remove the record"
    if not isinstance(record, dict) or not isinstance(record.get("resize", False), bool):
        raise SamoeError(fix)
    try:
        units = Units.from_json({k: record[k] for k in ("input_scale", "dn_calibration", "polarisations") if k in record}, where)
        classes = ClassList.from_json(record["classes"], f"{where} (classes)") if record.get("classes") is not None else None
    except SamoeError as e:
        raise SamoeError(f"{fix} ({e})") from None
    return DataSpec(units, classes, bool(record.get("resize", False)))


def class_list(spec: DataSpec | None, num_classes: int) -> ClassList | None:
    """The recorded classes, checked against the model's class count."""
    if spec is None or spec.classes is None:
        return None
    if len(spec.classes.names) != num_classes:
        raise SamoeError(f"the checkpoint records {len(spec.classes.names)} class names for a model of {num_classes} "
                         "classes: the record is damaged; re-create the checkpoint")
    return spec.classes
