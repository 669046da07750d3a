"""Tests for upscale/fastio.py: O_DIRECT shard writes, their buffered fallback, and digests old and new.

Oracles: the bytes handed to the writer (read back from the file), hashlib and
the `blake3` package on the raw file bytes, and the pre-BLAKE3 checkpoint digest
formula written out by hand.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3

import upscale.fastio as fastio
from upscale.checkpoint import META_FILE, Checkpoint
from upscale.errors import SamoeError
from upscale.fastio import ShardFile


def _pieces(sizes: list[int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("sizes", [[], [1], [4095], [4096], [4097], [3, 8192, 5000, 1], [40_000, 70_001, 12]])
def test_shard_file_writes_exactly_the_bytes(tmp_path, monkeypatch, direct, sizes):
    monkeypatch.setattr(fastio, "STAGING_BYTES", 16384)  # many buffer turnovers on small data
    pieces = _pieces(sizes)
    f = ShardFile(tmp_path / "x.bin", direct=direct)
    for p in pieces:
        f.write(p)
    assert f.close() == sum(sizes)
    assert (tmp_path / "x.bin").read_bytes() == b"".join(pieces)


def test_o_direct_refused_at_open_falls_back_to_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a, **kw):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")  # what tmpfs answers
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    pieces = _pieces([5000, 123])
    f = ShardFile(tmp_path / "x.bin")
    assert not f.direct
    for p in pieces:
        f.write(p)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(pieces)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_o_direct_refused_at_write_falls_back_to_buffered(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def refuse_first(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_first)
    monkeypatch.setattr(fastio, "STAGING_BYTES", 8192)
    pieces = _pieces([20_000, 7])
    f = ShardFile(tmp_path / "x.bin")
    direct_at_open = f.direct
    for p in pieces:
        f.write(p)
    f.close()
    assert (tmp_path / "x.bin").read_bytes() == b"".join(pieces)
    if direct_at_open:  # the file system took O_DIRECT at open, so the refused write switched to buffered
        assert not f.direct and calls[0] == calls[1] == 0


def test_other_write_errors_are_not_swallowed(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    f = ShardFile(tmp_path / "x.bin")
    f.write(b"abc")
    with pytest.raises(OSError, match="No space"):
        f.close()


def test_digests_match_reference_implementations(tmp_path):
    data = _pieces([3 * 2**20 + 17])[0]
    (tmp_path / "d").write_bytes(data)
    assert fastio.file_digest(tmp_path / "d", "sha256") == hashlib.sha256(data).hexdigest()
    assert fastio.file_digest(tmp_path / "d", "blake3") == blake3(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert fastio.file_digest(tmp_path / "e", "blake3") == blake3(b"").hexdigest()


def _as_sha256_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint whose samoe.json records sha256 shard digests, as samoe wrote them before BLAKE3."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / META_FILE).read_text())
    meta["files"] = {name: {"sha256": hashlib.sha256((dst / name).read_bytes()).hexdigest(), "bytes": info["bytes"]}
                     for name, info in meta["files"].items()}
    (dst / META_FILE).write_text(json.dumps(meta))
    return dst


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_new_and_old_checkpoints_verify_and_detect_damage(base, tmp_path, algorithm):
    path = shutil.copytree(base, tmp_path / "new") if algorithm == "blake3" else _as_sha256_checkpoint(base, tmp_path / "old")
    ck = Checkpoint.open(path)
    assert all(set(info) == {algorithm, "bytes"} for info in ck.files.values())
    assert ck.verify_digests() == []
    shard = next(iter(ck.files))
    _flip_last_byte(path / shard)
    assert Checkpoint.open(path).verify_digests() == [shard]


def test_checkpoint_digest_of_old_checkpoints_is_unchanged(base, tmp_path):
    """Lineages record `parent_digest`: for sha256 checkpoints it must be the formula samoe always used."""
    old = Checkpoint.open(_as_sha256_checkpoint(base, tmp_path / "old"))
    text = "".join(f"{name}:{old.files[name]['sha256']}\n" for name in sorted(old.files))
    assert old.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    new = Checkpoint.open(base)
    text = "".join(f"{name}:blake3:{new.files[name]['blake3']}\n" for name in sorted(new.files))
    assert new.digest == "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("entry", [{"bytes": 1}, {"sha256": "0" * 64, "blake3": "0" * 64, "bytes": 1},
                                   {"blake3": "0" * 63, "bytes": 1}, {"md5": "0" * 64, "bytes": 1}])
def test_malformed_digest_entries_are_refused(base, tmp_path, entry):
    path = shutil.copytree(base, tmp_path / "c")
    meta = json.loads((path / META_FILE).read_text())
    meta["files"] = {name: entry for name in meta["files"]}
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SamoeError, match="files"):
        Checkpoint.open(path)
