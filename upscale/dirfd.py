"""Files under a run, checkpoint or output directory, opened relative to it and never through a link.

Such directories are shared and handed between users, so any entry in them may
be a symbolic link to someone's folder, a FIFO that blocks a reader forever, or
a folder where a file belongs. Nothing below a directory is therefore opened by
path: a `Dir` holds a file descriptor of the directory and opens each name
relative to it (`dir_fd`) with `O_NOFOLLOW` (a link is refused, never followed)
and `O_NONBLOCK` (a FIFO cannot block), then checks with `fstat` that it got a
regular file or a directory. New files get a random temporary name, are created
with `O_CREAT | O_EXCL` (a planted name is never written through) and are moved
into place with `os.replace` inside the same directory descriptor. Subfolders
are made with `mkdir` and then opened the same way, which checks what was made.

Libraries that only take paths (TensorBoard, torch.distributed.checkpoint) get
`Dir.proc`, the `/proc/self/fd/N` path of a directory opened and checked here:
it names that directory itself, whatever happens to the path it came from.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import SamoeError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
# errors that say "this name is not the regular file or folder samoe expects": refused with a fix, never a traceback
_SHAPE_ERRORS = {errno.ELOOP: "is a symbolic link (samoe never follows links inside {root})",
                 errno.EMLINK: "is a symbolic link (samoe never follows links inside {root})",
                 errno.ENOTDIR: "is not a directory", errno.EISDIR: "is a directory, not a file",
                 errno.ENXIO: "is not a regular file", errno.ENOENT: "is missing"}


def new_token() -> str:
    """A random token: it names a writer's temporaries and is recorded where they are made."""
    return secrets.token_hex(8)


def temp_name(name: str, token: str) -> str:
    """The temporary name of `name` for the writer holding `token`."""
    return f".{name}.tmp-{token}"


def _file(fd: int, mode: str, name: Path) -> BinaryIO:
    """A buffered binary file object over `fd` whose `name` is its path (libraries such as tifffile read it)."""
    raw = io.FileIO(fd, mode)
    raw.name = str(name)
    return io.BufferedReader(raw) if mode == "rb" else io.BufferedWriter(raw)  # type: ignore[return-value]


def reserve_descriptors(n: int, what: str) -> None:
    """Make room to keep `n` more files open (a checkpoint pins each shard): the soft limit is raised toward
    the hard one when needed; a checkpoint that would still not fit is refused in one line."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 64
    need = used + n + 64  # headroom for the libraries' own files
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        raise SamoeError(f"{what} has {n} files, more than this process may keep open ({hard}): raise `ulimit -n` "
                         "or re-create it with larger shards")


def kind_of(st: os.stat_result | None) -> str | None:
    """'file', 'dir', 'link' or 'other' (FIFO, socket, device) for an lstat result; None when missing."""
    if st is None:
        return None
    mode = st.st_mode
    return ("file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "link" if stat.S_ISLNK(mode)
            else "other")


class PositionalFile(io.RawIOBase):
    """A read-only file object over a shared descriptor: `os.pread` at its own position, so many readers
    (threads included) can share one pinned descriptor without moving each other's offsets."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self.fd, self.name, self.pos = fd, name, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: os.fstat(self.fd).st_size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.pos + done)
            if n == 0:
                break
            done += n
        self.pos += done
        return done


class Dir:
    """An open directory; every name below it is opened relative to it, never through a link.

    `fix` ends every error about this directory's entries (what the user should do). Errors about the
    shape of an entry (a link, a FIFO, a folder where a file belongs, a missing name) are `SamoeError`s;
    other `OSError`s (a full disk, a read-only mount) pass through for the CLI to explain.
    """

    def __init__(self, fd: int, path: Path, fix: str) -> None:
        self.fd, self.path, self.fix = fd, Path(path), fix

    # -- opening

    @classmethod
    def open(cls, path: str | Path, fix: str, *, follow: bool = True, create: bool = False) -> "Dir":
        """Open directory `path`. `follow=False` refuses a link as its last component (its parents are the
        user's own path and are followed); `create` makes it (and missing parents) first."""
        path = Path(path)
        if create and path.name not in ("", ".", ".."):
            parent = cls.open(path.parent, fix, create=not os.path.isdir(path.parent))
            try:
                return parent.sub(path.name, create=True)
            finally:
                parent.close()
        if not follow and path.name not in ("", ".", ".."):
            parent = cls.open(path.parent, fix)
            try:
                return parent.sub(path.name)
            finally:
                parent.close()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except FileNotFoundError:
            raise SamoeError(f"{path} does not exist: {fix}") from None
        except NotADirectoryError:
            raise SamoeError(f"{path} is not a directory: {fix}") from None
        return cls(fd, path, fix)

    def __enter__(self) -> "Dir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    @property
    def proc(self) -> str:
        """A path naming exactly this open directory, for libraries that only take paths."""
        return f"/proc/self/fd/{self.fd}"

    def refuse(self, name: str, what: str) -> SamoeError:
        return SamoeError(f"{self.path / name} {what.format(root=self.path)}: {self.fix}")

    def _shape_error(self, name: str, e: OSError) -> SamoeError | None:
        what = _SHAPE_ERRORS.get(e.errno)
        if e.errno == errno.ENOTDIR and not name:
            what = "is not a directory"
        return self.refuse(name, what) if what else None

    # -- looking

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def kind(self, name: str) -> str | None:
        return kind_of(self.lstat(name))

    def names(self) -> list[str]:
        """The entries, sorted (`.` and `..` excluded)."""
        return sorted(os.listdir(self.fd))

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def sub(self, name: str, create: bool = False) -> "Dir":
        """Subfolder `name` (made first when `create` and missing); a link or a non-folder is refused."""
        _check_name(name)
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ENOTDIR and self.kind(name) == "link":
                raise self.refuse(name, _SHAPE_ERRORS[errno.ELOOP]) from None
            raise self._shape_error(name, e) or e from None
        return Dir(fd, self.path / name, self.fix)

    def mkdir(self, name: str) -> "Dir":
        """A new subfolder: `name` must not exist (O_EXCL for folders)."""
        _check_name(name)
        os.mkdir(name, 0o755, dir_fd=self.fd)
        return self.sub(name)

    # -- reading

    def open_fd(self, name: str, cap: int | None = None) -> int:
        """A read-only descriptor of regular file `name` (at most `cap` bytes), checked with fstat."""
        _check_name(name)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as e:
            raise self._shape_error(name, e) or e from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self.refuse(name, "is a directory, not a file" if stat.S_ISDIR(st.st_mode) else "is not a regular file")
            if cap is not None and st.st_size > cap:
                raise self.refuse(name, f"is {st.st_size} bytes, more than the {cap} samoe reads from such a file")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, name: str, cap: int | None = None) -> BinaryIO:
        return _file(self.open_fd(name, cap), "rb", self.path / name)

    def read_bytes(self, name: str, cap: int) -> bytes:
        """At most `cap` bytes of regular file `name`; a larger file is refused before it is read."""
        with self.open_read(name, cap) as f:
            return f.read(cap + 1)[:cap]

    def read_json(self, name: str, cap: int | None = None) -> Any:
        """Strict JSON (upscale.safe_io.parse_json) from regular file `name`."""
        from .safe_io import MAX_JSON_BYTES, json_error, parse_json

        data = self.read_bytes(name, cap or MAX_JSON_BYTES)
        try:
            return parse_json(data)
        except (ValueError, RecursionError) as e:
            raise self.refuse(name, f"is not valid JSON ({json_error(e)})") from None

    # -- writing

    def create_fd(self, name: str, mode: int = 0o644) -> int:
        """A new file `name` for writing: O_CREAT | O_EXCL | O_NOFOLLOW, so nothing already there is written through."""
        _check_name(name)
        return os.open(name, _NEW_FLAGS, mode, dir_fd=self.fd)

    def create(self, name: str) -> BinaryIO:
        """A new file `name` (create_fd) as a binary file object."""
        return _file(self.create_fd(name), "wb", self.path / name)

    @contextmanager
    def atomic(self, name: str, token: str | None = None) -> Iterator[BinaryIO]:
        """Write `name` whole or not at all: into a new temporary (named with `token`), fsync, then rename."""
        tmp = temp_name(name, token or new_token())
        f = _file(self.create_fd(tmp), "wb", self.path / name)
        try:
            with f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            self.replace(tmp, name)
        except BaseException:
            self.unlink(tmp, missing_ok=True)
            raise

    def write_bytes(self, name: str, data: bytes, token: str | None = None) -> None:
        with self.atomic(name, token) as f:
            f.write(data)

    def open_append(self, name: str) -> BinaryIO:
        """`name` opened for appending (created when missing); a link, FIFO or folder there is refused."""
        _check_name(name)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
        try:
            fd = os.open(name, flags, 0o644, dir_fd=self.fd)
        except OSError as e:
            raise self._shape_error(name, e) or e from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self.refuse(name, "is not a regular file")
        return _file(fd, "ab", self.path / name)

    def replace(self, src: str, dst: str, dst_dir: "Dir | None" = None) -> None:
        """Rename `src` here to `dst` (in `dst_dir`, default here); a link at `dst` is replaced, never followed."""
        _check_name(src)
        _check_name(dst)
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=(dst_dir or self).fd)

    def unlink(self, name: str, missing_ok: bool = False) -> None:
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmdir(self, name: str) -> None:
        _check_name(name)
        os.rmdir(name, dir_fd=self.fd)

    def remove_tree(self, name: str) -> None:
        """Remove folder `name` and everything in it, never following a link (shutil's fd-based rmtree).
        Only for a temporary this process made; everything else is removed by its manifest (upscale.ownership)."""
        _check_name(name)
        if self.kind(name) == "dir":
            shutil.rmtree(name, dir_fd=self.fd)
        else:
            self.unlink(name, missing_ok=True)

    def fsync(self) -> None:
        os.fsync(self.fd)


def _check_name(name: str) -> None:
    """One plain path component: names come from samoe or from files it checked, so anything else is a bug."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"{name!r} is not a plain file name")
