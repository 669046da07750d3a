"""Checkpoint directories: safetensors shards + index + `samoe.json`.

A checkpoint is a directory holding
    model.safetensors                       (one shard), or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json (weight_map)
    samoe.json                              config, provenance, lineage, stages, file digests

Writes stream tensors into shards inside a temporary sibling directory
(`.NAME.tmp-TOKEN`, upscale.ownership.NewOutput: its manifest is written first)
and rename it into place at the end, so a reader sees either no checkpoint or a
complete one. Reads parse safetensors headers directly (no tensor data); every
file is opened once, relative to the checkpoint's directory and never through a
link (upscale.dirfd), and kept open: the tensors, digests and headers a command
uses all come from the same files, even if the checkpoint is replaced meanwhile.
Nothing is ever unpickled.

Opening a checkpoint and reading its headers needs no torch (`samoe inspect-checkpoint`
starts in a fraction of the time torch takes to import): dtypes are named by strings
here, and torch is imported by the functions that make or read tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .config import SamMoEConfig
from .errors import SamoeError
from .dirfd import Dir, PositionalFile, reserve_descriptors
from .fastio import DEFAULT_DIGEST, DIGESTS, ShardFile, fd_digest, new_hasher
from .layout import state_shapes
from .ownership import NewOutput
from .safe_io import parse_json, plain_name

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
META_FILE = "samoe.json"
FORMAT = "samoe-checkpoint"
FORMAT_VERSION = 1
# Tensor names some older checkpoints hold that the model no longer has; they are skipped when read.
LEGACY_TRAINING_PREFIXES = ("loss.",)
DEFAULT_SHARD_BYTES = 2 * 1024**3

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a checkpoint may be stored in
# safetensors dtype -> torch dtype name (`torch.<name>`)
ST_TORCH_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# floating safetensors dtypes: the unsigned integer of their width, and the bits of their exponent
EXPONENT_MASKS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "BF16": ("<u2", 0x7F80),
                  "F16": ("<u2", 0x7C00)}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_OF_TORCH = {v: k for k, v in ST_TORCH_NAMES.items()}


def check_dtype(name: str) -> str:
    """A checkpoint dtype's name, checked (without importing torch)."""
    if name not in DTYPE_BYTES:
        raise SamoeError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return name


def parse_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, check_dtype(name))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def st_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (`F32` -> torch.float32)."""
    import torch

    return getattr(torch, ST_TORCH_NAMES[name])


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # absolute byte offset of the tensor's data in its file

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own cap


def read_header(fd: int, path: Path) -> dict[str, TensorInfo]:
    """Parse the safetensors header of open file `fd` (named `path` in messages) without touching tensor
    data, as strictly as safetensors' own reader.

    The header length must fit the file and the cap; the header is a UTF-8 JSON
    object; every entry has a known dtype, a shape of non-negative integers and
    two integer data offsets whose byte count matches the shape; the entries,
    sorted by offset, tile the data section exactly (from 0, no gap, no overlap,
    up to the end of the file); `__metadata__` maps strings to strings.
    """
    fix = "re-create it or check the path"
    f = PositionalFile(fd, str(path))
    try:
        size = os.fstat(fd).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SamoeError(f"{path} is not a safetensors file (only {size} bytes): re-create it")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
            raise SamoeError(f"{path} is not a safetensors file (bad header length): {fix}")
        raw = f.read(n)
    except OSError as e:
        raise SamoeError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = parse_json(raw)
    except (ValueError, RecursionError):
        raise SamoeError(f"{path} is not a safetensors file (unreadable header): {fix}") from None
    if not isinstance(header, dict):
        raise SamoeError(f"{path} is not a safetensors file (header is not a table): re-create it")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SamoeError(f"{path}: malformed header (__metadata__ is not a table of strings): re-create the file")
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
                and isinstance(entry["dtype"], str) and entry["dtype"] in ST_ITEMSIZE and _int_list(entry["shape"]) and _int_list(entry["data_offsets"])
                and len(entry["data_offsets"]) == 2 and entry["data_offsets"][0] <= entry["data_offsets"][1]):
            raise SamoeError(f"{path}: malformed header entry for tensor {name!r}: re-create the file")
        (lo, hi), shape = entry["data_offsets"], tuple(entry["shape"])
        info = TensorInfo(path.name, entry["dtype"], shape, hi - lo, 8 + n + lo)
        if info.numel * ST_ITEMSIZE[info.dtype] != hi - lo:
            raise SamoeError(f"{path}: malformed header entry for tensor {name!r} (shape and byte range disagree): re-create the file")
        infos[name] = info
        ranges.append((lo, hi, name))
    end = 0
    for lo, hi, name in sorted(ranges):
        if lo != end:
            what = "overlaps the previous one" if lo < end else "leaves a gap before it"
            raise SamoeError(f"{path}: the data of tensor {name!r} {what}: the file is damaged; re-create it")
        end = hi
    if 8 + n + end != size:
        raise SamoeError(
            f"shard {path.name} is truncated or padded ({size} bytes, header says {8 + n + end}): "
            "re-run the command that wrote it"
        )
    return infos


def _int_list(value: Any) -> bool:
    """A JSON list of non-negative integers (booleans and floats are not integers here)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def digest_of(info: dict[str, Any]) -> tuple[str, str]:
    """(algorithm, hex) of one `files` entry of samoe.json: `{"blake3": hex}` now, `{"sha256": hex}` before."""
    for algorithm in DIGESTS:
        if algorithm in info:
            return algorithm, info[algorithm]
    raise KeyError("no digest")


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer will receive: name, dtype and shape, known before any data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def shard_layout(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(n: int) -> list[str]:
    """The file names of a checkpoint's `n` shards (the usual `model-0000k-of-0000n` convention)."""
    return [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


def safetensors_header(shard: list[TensorSpec]) -> bytes:
    """The safetensors header (length prefix + JSON padded to 8 bytes) for tensors laid out in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        header[spec.name] = {"dtype": _ST_OF_TORCH[dtype_name(spec.dtype)], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """A tensor's bytes as a flat uint8 numpy view (on the CPU, contiguous), ready for ShardFile.write."""
    import torch

    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def read_tensor(f: Any, name: str, info: TensorInfo) -> torch.Tensor:
    """Exactly one tensor's bytes from open file `f` (its header entry checked by read_header), into a new tensor."""
    import torch

    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if f.readinto(memoryview(buf.numpy())) != info.nbytes:
        raise SamoeError(f"tensor {name} in {info.file} is cut short: the file is truncated; re-create it")
    return buf.view(st_dtype(info.dtype)).reshape(info.shape)


def write_safetensors(d: Dir, name: str, tensors: dict[str, torch.Tensor], direct: bool = True) -> int:
    """Write `tensors` as one new safetensors file `name` in open folder `d` (streamed; O_EXCL); returns its size."""
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    header = safetensors_header(specs)
    f = ShardFile(name, len(header) + sum(s.nbytes for s in specs), direct=direct, dir_fd=d.fd)
    try:
        f.write(header)
        for t in tensors.values():
            f.write(tensor_bytes(t))
        return f.close()
    except BaseException:
        f.abort()
        d.unlink(name, missing_ok=True)
        raise


def read_safetensors(d: Dir, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file `name` in open folder `d`, after the strict header check (read_header)."""
    fd = d.open_fd(name)
    try:
        f = PositionalFile(fd, str(d.path / name))
        return {key: read_tensor(f, key, info) for key, info in read_header(fd, d.path / name).items()}
    finally:
        os.close(fd)


class CheckpointWriter:
    """Stream tensors straight into safetensors shards, then commit atomically.

    The layout (names, dtypes, shapes, in order) is given up front, so each
    shard's header is known before its data and every tensor's bytes go to disk
    as soon as it is made: memory held is the tensor being written, not a shard.
    Digests (BLAKE3) are computed from the bytes as they are written (no
    re-read); shards are written through `O_DIRECT` where the file system
    allows it (see upscale/fastio.py).

    Use as a context manager: an exception (or KeyboardInterrupt) removes the
    temporary directory, so no half-written checkpoint is ever left at `out`.
    `parent`, when given, is the open directory `out` lives in (a run directory's
    step folder): the checkpoint is then written relative to it.
    """

    def __init__(self, out: Path, layout: list[TensorSpec], shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False,
                 digest: str = DEFAULT_DIGEST, direct: bool = True, parent: Dir | None = None) -> None:
        self.out = Path(out)
        self.digest = digest
        self.direct = direct
        names = [s.name for s in layout]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the checkpoint layout")
        self.output = NewOutput(self.out, "checkpoint", force, parent=parent)
        self.tmp = self.output.dir
        self.shards = shard_layout(layout, shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.queue = [(k, spec) for k, shard in enumerate(self.shards) for spec in shard]
        self.position = 0
        self.file = None
        self.hasher = None
        self.files: dict[str, dict[str, Any]] = {}
        self.total_bytes = sum(s.nbytes for s in layout)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, data: Any) -> None:
        self.file.write(data)  # hashes as it copies

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the layout (it must come in layout order, with its dtype and shape)."""
        if self.position >= len(self.queue):
            raise ValueError(f"tensor {name} is not in the checkpoint layout")
        k, spec = self.queue[self.position]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"expected {spec.name} {spec.dtype} {list(spec.shape)}, got {name} {tensor.dtype} {list(tensor.shape)}")
        if self.file is None:
            header = safetensors_header(self.shards[k])
            self.hasher = new_hasher(self.digest)
            self.output.owned.record(self.file_names[k])
            self.file = ShardFile(self.file_names[k], len(header) + sum(s.nbytes for s in self.shards[k]),
                                  direct=self.direct, hasher=self.hasher, dir_fd=self.tmp.fd)
            self._write(header)
        self._write(tensor_bytes(tensor))
        self.position += 1
        if self.position == len(self.queue) or self.queue[self.position][0] != k:
            file, self.file = self.file, None
            size = file.close()
            self.files[self.file_names[k]] = {self.digest: self.hasher.hexdigest(), "bytes": size}
            self.output.owned.record(self.file_names[k], size=size)

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write index and samoe.json (with file digests) and rename the directory into place."""
        if self.position != len(self.queue):
            raise ValueError(f"checkpoint incomplete: {len(self.queue) - self.position} tensors not written")
        owned = self.output.owned
        if len(self.shards) > 1:
            weight_map = {spec.name: self.file_names[k] for k, spec in self.queue}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            owned.record(INDEX_FILE)
            self.tmp.write_bytes(INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode(), owned.token)
        meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, files=self.files)
        owned.record(META_FILE)
        self.tmp.write_bytes(META_FILE, (json.dumps(meta, indent=2) + "\n").encode(), owned.token)
        return self.output.commit()

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None
        self.output.abort()


def _weight_map(d: Dir) -> dict[str, str]:
    """The index's weight_map: tensor name -> plain shard file name inside the checkpoint."""
    index_path = d.path / INDEX_FILE
    index = d.read_json(INDEX_FILE)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SamoeError(f"{index_path} is damaged (weight_map is not a table of tensor names to file names): re-create the checkpoint")
    bad = next((v for v in weight_map.values() if not plain_name(v)), None)
    if bad is not None:
        raise SamoeError(f"{index_path} maps a tensor to {bad!r}, which is not a plain file name inside {d.path}: "
                         "the index is damaged; re-create the checkpoint")
    return weight_map


_HEX = set("0123456789abcdef")


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """The parts of samoe.json that readers index into have the types they expect."""
    def bad(field: str, expect: str) -> SamoeError:
        return SamoeError(f"{where}: {field} must be {expect}: the checkpoint is damaged; re-create it")

    version = meta.get("format_version", 0)
    if type(version) is not int:
        raise bad("format_version", "an integer")
    if not isinstance(meta.get("config", {}), dict):
        raise bad("config", "a table")
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise bad("files", "a table of shard names")
    for name, info in files.items():
        if not plain_name(name):
            raise bad(f"files[{name!r}]", "a plain file name")
        algos = [a for a in DIGESTS if isinstance(info, dict) and a in info]
        if not (len(algos) == 1 and isinstance(info[algos[0]], str) and len(info[algos[0]]) == 64
                and set(info[algos[0]]) <= _HEX and type(info.get("bytes")) is int and info["bytes"] >= 0):
            raise bad(f"files[{name!r}]", "{\"blake3\" or \"sha256\": 64 hex digits, \"bytes\": a size}")
    if "dtype" in meta and (not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPE_BYTES):
        raise bad("dtype", " or ".join(DTYPE_BYTES))
    prov = meta.get("provenance", {})
    if not isinstance(prov, dict) or not all(isinstance(v, str) or isinstance(v, list) and all(isinstance(e, str) for e in v)
                                             for v in prov.values()):
        raise bad("provenance", "a table of strings (or lists of strings)")
    lineage = meta.get("lineage", [])
    if not isinstance(lineage, list) or not all(
            isinstance(e, dict) and isinstance(e.get("command"), str) and isinstance(e.get("version"), str)
            and (e.get("seed") is None or type(e.get("seed")) is int)
            and all(e.get(k) is None or isinstance(e.get(k), str) for k in ("parent", "parent_digest"))
            and (e.get("recipe") is None or isinstance(e.get("recipe"), dict)) for e in lineage):
        raise bad("lineage", "a list of {command, seed, version, parent, parent_digest, recipe}")
    stages = meta.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(e, dict) for e in stages):
        raise bad("stages", "a list of tables")
    growth = meta.get("growth", {})
    if not isinstance(growth, dict) or type(growth.get("stages_before", 0)) is not int or not (
            0 <= growth.get("stages_before", 0) <= len(stages)) or not isinstance(growth.get("source", ""), str):
        raise bad("growth", "a table with stages_before (a count of stages) and source (a path)")


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    """Digest of a whole checkpoint: sha256 over its shard names and digests.

    sha256 shard digests enter as bare hex (as they always did, so the digests
    that older lineages recorded still match); others as `algorithm:hex`."""
    def entry(info: dict[str, Any]) -> str:
        algorithm, hexdigest = digest_of(info)
        return hexdigest if algorithm == "sha256" else f"{algorithm}:{hexdigest}"

    text = "".join(f"{name}:{entry(files[name])}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- reading


class _Pinned:
    """The open files of a checkpoint: its directory and each shard, opened once and closed with the object."""

    def __init__(self, d: Dir) -> None:
        self.dir = d
        self.fds: dict[str, int] = {}
        self.sizes: dict[str, int] = {}  # each shard's size when its header was checked (the size it implies)

    def __del__(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}


@dataclass
class Checkpoint:
    """A checkpoint directory opened for reading: metadata and headers only, tensors on demand.

    Every file is opened once, at `open`, relative to the directory and never through a link, and kept
    open: the digest a command reports or records describes the very files its tensors are read from,
    even if another job replaces the checkpoint meanwhile (samoe writers never change a file in place)."""

    path: Path
    meta: dict[str, Any]
    config: SamMoEConfig
    tensors: dict[str, TensorInfo] = field(repr=False)
    pinned: _Pinned | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, d: Dir | None = None) -> "Checkpoint":
        """Open checkpoint `path` (a link to it is followed: the user named it), or the folder `d` already
        opened at `path` (a run directory's step, reached without following links)."""
        path = Path(path)
        if d is None:
            if not path.exists():
                raise SamoeError(f"checkpoint {path} does not exist: check the path")
            if not path.is_dir():
                raise SamoeError(f"{path} is a file, not a samoe checkpoint directory: pass the directory `samoe init` or `samoe expand` wrote")
            d = Dir.open(path, "the checkpoint is damaged; re-create it")
        pinned = _Pinned(d)
        meta_path = path / META_FILE
        if d.kind(META_FILE) is None:
            raise SamoeError(f"{path} is not a samoe checkpoint (no {META_FILE}): create one with `samoe init`")
        meta = d.read_json(META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise SamoeError(f"{meta_path} is not a samoe checkpoint description: re-create the checkpoint")
        check_meta(meta, meta_path)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise SamoeError(f"{path} uses checkpoint format {meta['format_version']}, newer than this samoe: upgrade samoe")
        config = SamMoEConfig.from_dict(meta.get("config", {}), where=str(meta_path))
        tensors: dict[str, TensorInfo] = {}
        shards = cls._shard_names(d, meta)
        reserve_descriptors(len(shards), str(path))
        for shard in shards:
            if d.kind(shard) is None:
                raise SamoeError(f"shard {shard} of {path} is missing: copy it back or re-create the checkpoint")
            fd = pinned.fds[shard] = d.open_fd(shard)
            pinned.sizes[shard] = os.fstat(fd).st_size
            for name, info in read_header(fd, path / shard).items():
                if name in tensors:
                    raise SamoeError(f"tensor {name} is stored twice ({tensors[name].file}, {shard}): re-create the checkpoint")
                tensors[name] = info
        cls._check_index(d, tensors)
        # task-loss weights, which checkpoints held until they became training state (stages/semisup.py)
        tensors = {n: info for n, info in tensors.items() if not n.startswith(LEGACY_TRAINING_PREFIXES)}
        return cls(path, meta, config, tensors, pinned)

    @staticmethod
    def _check_index(d: Dir, tensors: dict[str, TensorInfo]) -> None:
        """The index's weight_map must name exactly the tensors the shard headers hold, in the same files."""
        if d.kind(INDEX_FILE) is None:
            return
        weight_map = _weight_map(d)
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file != fname:
                where = f"in {tensors[name].file}" if name in tensors else "in no shard"
                raise SamoeError(f"{INDEX_FILE} of {d.path} maps {name} to {fname} but it is {where}: the index is damaged; re-create the checkpoint")
        unmapped = sorted(set(tensors) - set(weight_map))
        if unmapped:
            raise SamoeError(f"{INDEX_FILE} of {d.path} does not list tensor {unmapped[0]} ({len(unmapped)} in all): the index is damaged; re-create the checkpoint")

    @staticmethod
    def _shard_names(d: Dir, meta: dict[str, Any]) -> list[str]:
        """The shard files the format names: the index's, or the single file."""
        files = list(meta.get("files", {}))
        if d.kind(INDEX_FILE) is not None:
            in_index = sorted(set(_weight_map(d).values()))
            missing = sorted(set(files) - set(in_index))
            if missing:
                raise SamoeError(f"shard {missing[0]} of {d.path} is missing from {INDEX_FILE}: re-create the checkpoint")
            return in_index
        if d.kind(SINGLE_FILE) is not None or files == [SINGLE_FILE]:
            return [SINGLE_FILE]
        raise SamoeError(f"{d.path} has neither {SINGLE_FILE} nor {INDEX_FILE}: the checkpoint is incomplete; re-create it")

    # -- metadata helpers
    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.get("provenance", {})

    @property
    def lineage(self) -> list[dict[str, Any]]:
        return self.meta.get("lineage", [])

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.meta.get("stages", [])

    @property
    def digest(self) -> str:
        return files_digest(self.meta.get("files", {}))

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.meta.get("files", {})

    def check_matches_config(self) -> None:
        """The tensors on disk are exactly the ones the config's model has, with the same shapes."""
        expected = state_shapes(self.config)  # the config's ranges were checked when it was read
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing:
            raise SamoeError(f"{self.path}: {META_FILE} does not match the tensors: {len(missing)} missing, e.g. {missing[0]}; re-create the checkpoint")
        if extra:
            raise SamoeError(f"{self.path}: {META_FILE} does not match the tensors: {len(extra)} unexpected, e.g. {extra[0]}; re-create the checkpoint")
        dtype = _ST_OF_TORCH[check_dtype(self.meta.get("dtype", "float32"))]
        odd = sorted(n for n, info in self.tensors.items() if info.dtype != dtype)
        if odd:
            raise SamoeError(f"{self.path}: tensor {odd[0]} is {self.tensors[odd[0]].dtype} but {META_FILE} says {self.meta.get('dtype')}: re-create the checkpoint")
        for name, shape in expected.items():
            if self.tensors[name].shape != shape:
                raise SamoeError(
                    f"{self.path}: tensor {name} has shape {list(self.tensors[name].shape)} but {META_FILE} implies {list(shape)}: re-create the checkpoint"
                )

    def shard_file(self, fname: str) -> PositionalFile:
        """A reader of shard `fname` as opened at `open` (its own position; many may share the file)."""
        return PositionalFile(self._fd(fname), str(self.path / fname))

    def _fd(self, fname: str) -> int:
        if self.pinned is None or fname not in self.pinned.fds:
            raise SamoeError(f"{self.path / fname} is not a shard of {self.path}: re-create the checkpoint")
        return self.pinned.fds[fname]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor: exactly its bytes, straight into a new tensor (no mapping of the whole shard)."""
        info = self.tensors[name]
        return read_tensor(self.shard_file(info.file), name, info)

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterable[tuple[str, torch.Tensor]]:
        """Yield tensors file by file in storage order (sequential reads)."""
        wanted = set(self.tensors if names is None else names)
        by_file: dict[str, list[str]] = {}
        for name, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            if name in wanted:
                by_file.setdefault(info.file, []).append(name)
        for fname, tensor_names in by_file.items():
            f = self.shard_file(fname)
            for name in tensor_names:
                yield name, read_tensor(f, name, self.tensors[name])

    def nonfinite_tensors(self, chunk_bytes: int = 64 << 20) -> list[str]:
        """Names of floating tensors holding NaN or Inf (reads every tensor once, in chunks of at most `chunk_bytes`).

        Checked on the raw bits with numpy, so `inspect-checkpoint --verify` needs no torch: an IEEE value (bf16
        included) is NaN or Inf exactly when its exponent bits are all ones."""
        import numpy as np

        bad = []
        for name, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            if info.dtype not in EXPONENT_MASKS:
                continue
            width, mask = EXPONENT_MASKS[info.dtype]
            f, left = self.shard_file(info.file), info.nbytes
            f.seek(info.offset)
            buf = np.empty(min(left, chunk_bytes - chunk_bytes % np.dtype(width).itemsize), dtype=np.uint8)
            while left:
                part = memoryview(buf)[: min(left, len(buf))]
                if f.readinto(part) != len(part):
                    raise SamoeError(f"tensor {name} in {info.file} is cut short: the file is truncated; re-create it")
                if ((np.frombuffer(part, dtype=width) & mask) == mask).any():
                    bad.append(name)
                    break
                left -= len(part)
        return bad

    def verify_digests(self) -> list[str]:
        """Recompute the digests of the shards the index and the format name; return the names that do not match.

        Only shards are hashed: `samoe.json` may list no other file, and every shard's size must be the one its
        header implies and the one recorded before a byte of it is hashed, so the cost is the checkpoint's real
        size. A shard with no recorded digest cannot be verified: that is an error, not a pass."""
        shards = sorted(self.pinned.fds) if self.pinned is not None else []
        unrecorded = sorted(set(shards) - set(self.files))
        if unrecorded:
            raise SamoeError(f"shard {unrecorded[0]} of {self.path} has no digest in {META_FILE}: it cannot be verified; "
                             "re-create the checkpoint with the command that wrote it")
        extra = sorted(set(self.files) - set(shards))
        if extra:
            raise SamoeError(f"{META_FILE} of {self.path} lists {extra[0]}, which is not one of its {len(shards)} shard(s): "
                             "the checkpoint is damaged; re-create it")
        bad = []
        for fname in shards:
            info, fd = self.files[fname], self._fd(fname)
            size = os.fstat(fd).st_size
            if size != info["bytes"] or size != self.pinned.sizes[fname]:
                bad.append(fname)
                continue
            algorithm, expected = digest_of(info)
            if fd_digest(fd, algorithm) != expected:
                bad.append(fname)
        return bad


# --------------------------------------------------------------------------- model-level helpers


def lineage_entry(command: list[str], seed: int | None, parent: Checkpoint | None,
                  recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """One step of a checkpoint's history; `recipe`: the resolved settings the command ran with."""
    from . import __version__

    entry = {
        "command": " ".join(command),
        "seed": seed,
        "version": __version__,
        "parent": str(parent.path.resolve()) if parent else None,
        "parent_digest": parent.digest if parent else None,
    }
    if recipe is not None:
        entry["recipe"] = recipe
    return entry


def build_meta(
    config: SamMoEConfig,
    provenance: dict[str, Any],
    lineage: list[dict[str, Any]],
    stages: list[dict[str, Any]],
    dtype: torch.dtype,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "dtype": dtype_name(dtype),
        "provenance": provenance,
        "lineage": lineage,
        "stages": stages,
        **extra,
    }


def save_model(
    model: torch.nn.Module,
    out: str | Path,
    meta: dict[str, Any],
    dtype: torch.dtype | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    parent: Dir | None = None,
) -> Path:
    """Write `model`'s state dict as a checkpoint (floating tensors cast to `dtype`); `parent`: the open
    directory `out` lives in, when the caller holds one (CheckpointWriter)."""
    state = model.state_dict()

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    layout = [TensorSpec(name, out_dtype(t), tuple(t.shape)) for name, t in state.items()]
    with CheckpointWriter(Path(out), layout, shard_bytes=shard_bytes, force=force, parent=parent) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor.to(out_dtype(tensor)))
        return writer.commit(meta)


def load_model(path: "str | Path | Checkpoint", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Rebuild the model from `samoe.json` and load its tensors (safetensors only, no pickle).

    Pass the `Checkpoint` a command already opened, so the weights come from the files it described."""
    from .model import build_model

    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    ckpt.check_matches_config()
    try:  # the meta device allocates nothing
        model = build_model(ckpt.config, device="meta")
    except (AssertionError, ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise SamoeError(f"{ckpt.path}: the config in {META_FILE} does not describe a buildable model "
                         f"({type(e).__name__}): the checkpoint is damaged; re-create it") from None
    state = {}
    for name, tensor in ckpt.iter_tensors():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model
