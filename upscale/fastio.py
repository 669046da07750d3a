"""Writing and hashing checkpoint shards at disk speed.

A 10B expand writes ~20 GB. Buffered `write()` into the page cache costs about
2 s of system CPU per GB on this kind of VM (fresh pages are faulted in, then
written back), which made the I/O thread the critical path. `ShardFile` writes
through `O_DIRECT` instead: bytes are copied into two page-aligned staging
buffers and a background thread `pwrite`s a full buffer while the caller fills
the other, so copying, hashing and the disk overlap. File systems that refuse
`O_DIRECT` (tmpfs, some FUSE/overlay mounts answer EINVAL at open or at the
first write) get the same code path with ordinary buffered writes.

Digests: new files are hashed with BLAKE3 (the `blake3` package, ~2x sha256 per
core); `samoe.json` names the algorithm per file (`{"blake3": hex}` or the
older `{"sha256": hex}`), so checkpoints written before still verify.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

ALIGN = 4096  # O_DIRECT needs offset, length and buffer address aligned to the logical block size (<= 4096 in practice)
STAGING_BYTES = 32 * 1024**2
DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"


def new_hasher(algorithm: str = DEFAULT_DIGEST) -> Any:
    """A streaming hasher with `update()` and `hexdigest()` (both algorithms give 64 hex digits)."""
    if algorithm == "blake3":
        from blake3 import blake3

        return blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r}")


def fd_digest(fd: int, algorithm: str) -> str:
    """Hex digest of a whole open file (memory-mapped; BLAKE3 hashes on all cores). The caller checked its size."""
    if algorithm == "blake3":
        from blake3 import blake3

        h = blake3(max_threads=blake3.AUTO)
    else:
        h = new_hasher(algorithm)
    if os.fstat(fd).st_size == 0:
        return h.hexdigest()
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
        if algorithm == "blake3":
            h.update(m)
        else:
            view = memoryview(m)
            for start in range(0, len(view), 16 * 1024**2):
                h.update(view[start:start + 16 * 1024**2])
            view.release()
    return h.hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a whole file named by path (tests and tools; commands hash the files they hold open)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return fd_digest(fd, algorithm)
    finally:
        os.close(fd)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class ShardFile:
    """A new file written sequentially, through O_DIRECT where the file system allows it.

    `write()` copies bytes into the current aligned staging buffer (and feeds
    them to `hasher`, if given, while they are in cache); a full buffer
    is handed to a single writer thread (`pwrite` releases the GIL) and the other
    buffer is filled meanwhile. `close()` writes the zero-padded aligned tail,
    truncates the file to its real length and fsyncs it. Peak memory: two
    staging buffers, whatever the file size.
    """

    def __init__(self, path: Path | str, size_hint: int | None = None, direct: bool = True, hasher: Any = None,
                 dir_fd: int | None = None) -> None:
        # with `dir_fd` (a folder upscale.dirfd made): a new name only, so nothing already there is written through
        flags = (os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
                 | (os.O_EXCL if dir_fd is not None else os.O_TRUNC))
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644, dir_fd=dir_fd)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
        cap = STAGING_BYTES if size_hint is None else max(ALIGN, min(STAGING_BYTES, _round_up(size_hint, ALIGN)))
        self.cap = cap
        self.maps = [mmap.mmap(-1, cap) for _ in range(2)]  # anonymous maps are page-aligned
        self.bufs = [memoryview(m) for m in self.maps]
        self.pending: list[Future | None] = [None, None]
        self.cur = 0
        self.fill = 0
        self.offset = 0  # file offset of the current buffer's first byte
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-write")
        self.hasher = hasher

    @property
    def size(self) -> int:
        return self.offset + self.fill

    def write(self, data: Any) -> None:
        """Append bytes (anything exposing a C-contiguous buffer: bytes, numpy arrays)."""
        src = memoryview(data).cast("B")
        pos = 0
        while pos < src.nbytes:
            if self.fill == 0:
                self._wait(self.cur)  # the buffer we are about to fill may still be on its way to disk
            n = min(self.cap - self.fill, src.nbytes - pos)
            piece = self.bufs[self.cur][self.fill:self.fill + n]
            piece[:] = src[pos:pos + n]
            if self.hasher is not None:  # hashed piece by piece while hot in cache, so the disk never waits for a whole tensor's hash
                self.hasher.update(piece)
            self.fill += n
            pos += n
            if self.fill == self.cap:
                self._submit(self.cap)

    def _submit(self, length: int) -> None:
        i, offset = self.cur, self.offset
        self.pending[i] = self.pool.submit(self._put, i, length, offset)
        self.offset += self.fill
        self.cur = 1 - self.cur
        self.fill = 0

    def _wait(self, i: int) -> None:
        fut, self.pending[i] = self.pending[i], None
        if fut is not None:
            fut.result()

    def _put(self, i: int, length: int, offset: int) -> None:
        view = memoryview(self.maps[i])[:length]
        done = 0
        while done < length:
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # The file system accepted O_DIRECT at open but not this write: fall back to buffered.
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False

    def close(self) -> int:
        """Write the tail, set the exact length, fsync, close; returns the file size."""
        size = self.size
        try:
            if self.fill:
                length = self.fill
                if self.direct:
                    length = _round_up(self.fill, ALIGN)
                    self.bufs[self.cur][self.fill:length] = bytes(length - self.fill)
                self._submit(length)
            self._wait(0)
            self._wait(1)
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        """Stop writing and release everything (the caller removes the file)."""
        for i in (0, 1):
            fut, self.pending[i] = self.pending[i], None
            if fut is not None:
                fut.exception()  # wait: a write must not touch a released buffer
        self.pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for view in self.bufs:
            view.release()
        self.bufs = []
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view is still referenced somewhere: the GC frees the map later
                pass
        self.maps = []
