"""Read torch.distributed.checkpoint (DCP) steps without running code from the run directory.

DCP stores its `.metadata` as a pickle, and torch's `FileSystemReader` loads it
with the full unpickler: a pickle planted in a run directory would run on the
next resume. Here the metadata goes through an allow-list unpickler that can
build only what torch 2.x's writer pickles (found by disassembling real DCP
checkpoints of 1 and 2 processes with pickletools): the dataclasses of
`torch.distributed.checkpoint.metadata`, the filesystem writer's `_StorageInfo`,
`torch.Size`, torch dtypes, the strided layout (`torch.serialization._get_layout`)
and `pathlib.PosixPath` (the checkpoint id). Any other global is refused before
it is called. The unpickled metadata is then checked field by field (types,
shapes, chunk bounds, data files that are plain files inside the step and byte
ranges inside them) so that DCP's own loader never sees a lie. Tensor data
files are read by DCP with `torch.load(weights_only=True)`, torch's own
restricted unpickler.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint.filesystem import _StorageInfo

from upscale.errors import SamoeError

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 256 * 1024**2  # ~1e6 tensor chunks; a larger file is not one samoe wrote

_ALLOWED: dict[tuple[str, str], Any] = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_meta, n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Refused(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that can only name DCP's metadata classes, torch.Size, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def _refuse(path: Path, what: str) -> SamoeError:
    return SamoeError(f"{path} holds a pickle that names {what}; samoe loads no code from run directories; "
                      "delete the step or use a new --run-dir")


def _damaged(path: Path, why: str) -> SamoeError:
    return SamoeError(f"{path} is damaged ({why}): delete the step or use a new --run-dir (or --force to start over)")


def _read_regular(path: Path, cap: int, shown: Path) -> bytes:
    """The bytes of a regular file (not a link, not a FIFO), at most `cap` of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SamoeError(f"{shown} is missing: the checkpoint step is incomplete; delete it or use a new --run-dir") from None
    except OSError:
        raise _damaged(shown, "not a regular file") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _damaged(shown, "not a regular file")
        if st.st_size > cap:
            raise _damaged(shown, f"{st.st_size} bytes, more than the {cap} a checkpoint's metadata may hold")
        return f.read(cap + 1)[:cap]


def load_metadata(path: Path, shown: Path | None = None) -> dcp_meta.Metadata:
    """Unpickle one DCP metadata file through the allow-list; refuse anything else (`shown`: its name in messages)."""
    data = _read_regular(path, MAX_METADATA_BYTES, shown or path)
    path = shown or path
    try:
        md = AllowListUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise _refuse(path, e.what) from None
    except Exception as e:  # truncated or malformed pickles raise many types
        raise _damaged(path, f"{type(e).__name__}") from None
    return md


def _size(value: Any, where: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, torch.Size) or any(not isinstance(v, int) or v < 0 for v in value):
        raise _damaged(path, f"{where} is not a tensor size")
    return tuple(value)


def check_metadata(md: Any, step: Path, path: Path) -> dcp_meta.Metadata:
    """Every field DCP's loader uses has the type it expects, and every byte range lies inside a data file of `step`
    (`path`: the metadata file's name in messages)."""
    if not isinstance(md, dcp_meta.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise _damaged(path, "not DCP metadata")
    for key, item in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise _damaged(path, "a key is not a string")
        if isinstance(item, dcp_meta.BytesStorageMetadata):
            continue
        if not isinstance(item, dcp_meta.TensorStorageMetadata) or not isinstance(item.properties, dcp_meta.TensorProperties) \
                or not isinstance(item.properties.dtype, torch.dtype) or not isinstance(item.chunks, list):
            raise _damaged(path, f"entry {key!r} is not a tensor description")
        size = _size(item.size, f"the size of {key!r}", path)
        for chunk in item.chunks:
            if not isinstance(chunk, dcp_meta.ChunkStorageMetadata):
                raise _damaged(path, f"a chunk of {key!r} is not a chunk description")
            lo = _size(chunk.offsets, f"a chunk offset of {key!r}", path)
            n = _size(chunk.sizes, f"a chunk size of {key!r}", path)
            if len(lo) != len(size) or len(n) != len(size) or any(a + b > s for a, b, s in zip(lo, n, size)):
                raise _damaged(path, f"a chunk of {key!r} lies outside the tensor")
    if md.planner_data is not None and not (isinstance(md.planner_data, dict) and all(
            isinstance(k, str) and isinstance(v, (tuple, list)) and all(isinstance(p, (str, int)) for p in v)
            for k, v in md.planner_data.items())):
        raise _damaged(path, "planner data is not a key map")
    if not isinstance(md.storage_data, dict):
        raise _damaged(path, "no storage table")
    sizes: dict[str, int] = {}
    for index, info in md.storage_data.items():
        if not isinstance(index, dcp_meta.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise _damaged(path, "the storage table holds something else")
        name = info.relative_path
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise _damaged(path, f"data file {name!r} is not a plain file name inside {path.parent.name}")
        if info.transform_descriptors:
            raise _damaged(path, "data is stored with transforms samoe does not write")
        if name not in sizes:
            try:
                st = os.lstat(step / name)
            except OSError:
                raise _damaged(path, f"data file {name} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise _damaged(path, f"data file {name} is not a regular file")
            sizes[name] = st.st_size
        off, length = info.offset, info.length
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in (off, length)) or off + length > sizes[name]:
            raise _damaged(path, f"a byte range lies outside data file {name}")
    return md


def read_metadata(step: Path, rank: int | None = None, shown: Path | None = None) -> dcp_meta.Metadata:
    """The validated metadata of the DCP directory `step` (global, or one rank's local file); `shown` names
    `step` in messages when it is read through a descriptor's path (upscale.dirfd.Dir.proc)."""
    if shown is None and step.is_symlink():  # (a descriptor's path is a link to the folder opened without following)
        raise _damaged(step, "a link: samoe reads checkpoints only from inside the run directory")
    name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
    path = (shown or step) / name
    return check_metadata(load_metadata(step / name, path), step, path)


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader with `read_metadata` replaced by the allow-list reader above."""

    def __init__(self, path: str, shown: Path | None = None, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.shown = shown

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_meta.Metadata:
        md = read_metadata(Path(self.path), kwargs.get("rank"), self.shown)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_meta.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
