"""What the numbers in a SAR image mean: the input scale, its conversion to dB, and a check that it is plausible.

A folder's images are in one of these units (`--input-scale`, or `data.json`):

    linear     backscatter power, sigma0 (the default; demo data)        dB = 10 log10(x)
    db         sigma0 in decibels                                         dB = x
    amplitude  sqrt(sigma0)                                               dB = 20 log10(x)
    dn         calibrated digital numbers, sigma0 = (DN / A)^2            dB = 20 log10(x / A), A = --dn-calibration
    display    8/16-bit quick-looks whose integer range spans -30..+5 dB  (no log: x / dtype max)

Every scale maps to the same dB value before `stages.data.sar_to_input` clips and
standardises it, so one scene stored in any of them gives the model the same
input. The scale of the training data is recorded in the checkpoint; `eval`,
`pseudo-label` and `predict` use it for data that does not declare its own.

Values contradict a scale in ways a wrong declaration cannot hide, and such
input is refused (one line naming `--input-scale`) instead of being squashed
into a near-constant image: dB values are mostly negative, power and amplitude
never are; power above 10 (+10 dB) for a whole scene's median is not backscatter
but digital numbers; DN are never negative nor mostly below 1. Power and
amplitude cannot be told apart by their values (both are small and positive):
declare them right.

`data.json` (in the data folder, or beside the folders, in their parent)::

    {"input_scale": "db", "polarisations": ["VV", "VH"]}
    {"input_scale": "dn", "dn_calibration": 474.0, "polarisations": ["HH"]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upscale.errors import DataError, SamoeError

if TYPE_CHECKING:  # numpy is imported where values are converted: inspect and plan start without it
    import numpy as np


SCALES: tuple[str, ...] = ("linear", "db", "amplitude", "dn", "display")
POLARISATIONS: tuple[str, ...] = ("VV", "VH", "HH", "HV")
DATA_JSON = "data.json"
FLOOR = 1e-6  # linear power floor before the log (-60 dB): no log(0)
_JSON_KEYS = ("input_scale", "dn_calibration", "polarisations")
_FIX = "declare the right one with --input-scale (eval, pseudo-label, predict), \"input_scale\" in data.json, or input_scale in a train recipe"


@dataclass(frozen=True)
class Units:
    """How to read a folder's pixel values: the scale, the DN calibration constant, the bands' polarisations."""

    scale: str = "linear"
    dn_calibration: float | None = None
    polarisations: tuple[str, ...] | None = None

    def checked(self, where: str = "--input-scale") -> "Units":
        if self.scale not in SCALES:
            raise SamoeError(f"{where}: input scale {self.scale!r} is not one of {', '.join(SCALES)}")
        cal = self.dn_calibration
        if self.scale == "dn" and (cal is None or not (isinstance(cal, (int, float)) and math.isfinite(cal) and cal > 0)):
            raise SamoeError(f"{where}: --input-scale dn needs the calibration constant A of sigma0 = (DN / A)^2 "
                             "(--dn-calibration, or \"dn_calibration\" in data.json; e.g. about 474 for Sentinel-1 "
                             "IW GRD, read yours from the product's calibration annotation)")
        if self.polarisations is not None:
            check_polarisations(self.polarisations, where)
        return self

    @property
    def bands(self) -> int | None:
        return None if self.polarisations is None else len(self.polarisations)

    def to_json(self) -> dict[str, Any]:
        return {"input_scale": self.scale, "dn_calibration": self.dn_calibration if self.scale == "dn" else None,
                "polarisations": list(self.polarisations) if self.polarisations is not None else None}

    @classmethod
    def from_json(cls, data: Any, where: str, complete: bool = True) -> "Units":
        """Units from a checkpoint's record or a data.json table (`where` names it in errors); `complete`: the
        values must stand alone (data.json's dn may take its calibration from the command line)."""
        if not isinstance(data, dict):
            raise SamoeError(f"{where}: the input units must be a table like {{\"input_scale\": \"db\"}}")
        scale = data.get("input_scale", "linear")
        cal = data.get("dn_calibration")
        pols = data.get("polarisations")
        if not isinstance(scale, str) or (cal is not None and (isinstance(cal, bool) or not isinstance(cal, (int, float)))):
            raise SamoeError(f"{where}: input_scale must be a string and dn_calibration a number")
        if pols is not None and not (isinstance(pols, list) and all(isinstance(p, str) for p in pols)):
            raise SamoeError(f"{where}: polarisations must be a list of band names such as [\"VV\", \"VH\"]")
        units = cls(scale, float(cal) if cal is not None else None, tuple(pols) if pols is not None else None)
        if complete:
            return units.checked(where)
        replace(units, scale="linear").checked(where)  # all but the calibration a dn scale may still lack
        return units

    def describe(self) -> str:
        scale = f"dn (A = {self.dn_calibration:g})" if self.scale == "dn" else self.scale
        return scale + (f", {'/'.join(self.polarisations)}" if self.polarisations else "")


def check_polarisations(names: tuple[str, ...], where: str) -> tuple[str, ...]:
    if not 1 <= len(names) <= 2 or len(set(names)) != len(names) or any(n not in POLARISATIONS for n in names):
        raise SamoeError(f"{where}: polarisations {','.join(names)!r} must be one or two distinct names of "
                         f"{', '.join(POLARISATIONS)} in band order, e.g. VV,VH or HH")
    return names


def parse_polarisations(text: str | None, option: str = "--polarisations") -> tuple[str, ...] | None:
    """`VV,VH` -> ("VV", "VH"); None stays None."""
    if text is None:
        return None
    return check_polarisations(tuple(p.strip().upper() for p in text.split(",") if p.strip()), option)


# --------------------------------------------------------------------------- conversion


def to_db(chw: np.ndarray, units: Units) -> np.ndarray:
    """float64 dB of a (C, H, W) image in `units` (any scale but display); NaN and -inf -> -60 dB, +inf -> huge."""
    import numpy as np
    x = chw.astype(np.float64)
    if units.scale == "db":
        return np.nan_to_num(x, nan=10 * math.log10(FLOOR), posinf=np.finfo(np.float64).max, neginf=10 * math.log10(FLOOR))
    x = np.nan_to_num(x, nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)
    if units.scale == "linear":
        power = x
    elif units.scale == "amplitude":
        power = np.square(np.minimum(np.abs(x), 1e150))
    elif units.scale == "dn":
        power = np.square(np.minimum(np.abs(x), 1e150) / float(units.dn_calibration))  # type: ignore[arg-type]
    else:
        raise ValueError(f"to_db does not convert {units.scale!r} values")
    return 10.0 * np.log10(np.maximum(power, FLOOR))


# --------------------------------------------------------------------------- plausibility


def check_plausible(values: np.ndarray, dtype: np.dtype, units: Units, where: str) -> None:
    """Refuse values that contradict the declared scale (see the module docstring), naming the option.

    `values`: a sample of the image's stored values (NaN and nodata may be present);
    `dtype`: the file's data type.
    """
    import numpy as np
    scale = units.scale
    if scale == "display":
        if np.dtype(dtype).kind not in "ui":
            raise DataError(f"{where} holds {dtype} values, but --input-scale display means 8/16-bit integer quick-looks: "
                            f"{_FIX} (linear, db or amplitude for floats)")
        return
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return
    negative = float((v < 0).mean())
    median = float(np.median(v))
    says = f"{where} does not hold {_SCALE_NAMES[scale]}"
    if scale in ("linear", "amplitude", "dn") and negative > (0.0 if scale == "dn" else 0.05):
        raise DataError(f"{says}: {negative:.0%} of its values are negative, as dB values are, and {scale} values never are; "
                        f"{_FIX} (db?)")
    if scale == "db" and median > 0:
        raise DataError(f"{says}: its median value is {median:.4g}, while backscatter in dB is mostly below 0 "
                        f"(land -5..-25 dB, water below -15 dB); {_FIX} (linear, amplitude or dn?)")
    limit = {"linear": 10.0, "amplitude": math.sqrt(10.0)}.get(scale)
    if limit is not None and median > limit:
        raise DataError(f"{says}: its median value is {median:.4g}, while a scene's median {scale} is below {limit:.3g} "
                        f"(+10 dB); values like these are digital numbers or display-scaled integers: {_FIX} (dn or display?)")
    if scale == "dn" and median < 1:
        raise DataError(f"{says}: its median value is {median:.4g}, while digital numbers count amplitude in tens to "
                        f"thousands; {_FIX} (linear or amplitude?)")


_SCALE_NAMES = {"linear": "linear backscatter power", "db": "backscatter in dB", "amplitude": "amplitude",
                "dn": "digital numbers"}


# --------------------------------------------------------------------------- data.json and resolution


def find_beside(folder: Path, name: str) -> Path | None:
    """`folder/name`, else `folder/../name` (one file beside A/, A-test/, B/ serves all of them), else None."""
    for candidate in (Path(folder) / name, Path(folder).parent / name):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def read_data_json(folder: Path) -> tuple[Units | None, Path | None]:
    """The units a folder declares in data.json (and the file), or (None, None)."""
    from upscale.safe_io import load_json

    path = find_beside(folder, DATA_JSON)
    if path is None:
        return None, None
    data = load_json(path, "fix or remove the file", cap=1024**2)
    if not isinstance(data, dict):
        raise DataError(f"{path} must be a JSON table like {{\"input_scale\": \"db\", \"polarisations\": [\"VV\", \"VH\"]}}")
    unknown = sorted(set(data) - set(_JSON_KEYS))
    if unknown:
        raise DataError(f"{path} has the unknown key {unknown[0]!r}: the keys are {', '.join(_JSON_KEYS)}")
    if "input_scale" not in data:
        raise DataError(f"{path} has no \"input_scale\": add one of {', '.join(SCALES)}")
    return Units.from_json(data, str(path), complete=data["input_scale"] != "dn"), path


@dataclass(frozen=True)
class UnitOptions:
    """What the command line says about units (None: not given)."""

    scale: str | None = None
    dn_calibration: float | None = None
    polarisations: tuple[str, ...] | None = None


def resolve_units(folder: Path | None, options: UnitOptions = UnitOptions(), recorded: Units | None = None) -> Units:
    """The units of `folder`'s images: the command line, else its data.json, else `recorded` (a checkpoint's), else linear.

    An option that contradicts data.json is refused: one of them is wrong.
    """
    declared, path = read_data_json(folder) if folder is not None else (None, None)
    if declared is not None:
        for option, given, have in (("--input-scale", options.scale, declared.scale),
                                    ("--dn-calibration", options.dn_calibration, declared.dn_calibration),
                                    ("--polarisations", options.polarisations, declared.polarisations)):
            if given is not None and have is not None and given != have:
                shown = ",".join(given) if isinstance(given, tuple) else given
                raise DataError(f"{option} {shown} contradicts {path}: drop the option or fix the file")
        base = declared
    else:
        base = recorded if recorded is not None else Units()
        if options.scale is not None and options.scale != base.scale:
            base = Units(options.scale, None, base.polarisations)
    units = replace(base, scale=options.scale or base.scale,
                    dn_calibration=options.dn_calibration if options.dn_calibration is not None else base.dn_calibration,
                    polarisations=options.polarisations if options.polarisations is not None else base.polarisations)
    return units.checked(str(path) if path is not None and options == UnitOptions() else "--input-scale")


def check_bands(count: int, units: Units, where: str) -> None:
    """An image's band count must match the declared polarisations (a VV,VH model fed one band sees a different input)."""
    if units.polarisations is not None and count != len(units.polarisations):
        raise DataError(f"{where} has {count} band(s) but the data are declared {','.join(units.polarisations)} "
                        f"({len(units.polarisations)}): give scenes with those bands, or declare --polarisations")
