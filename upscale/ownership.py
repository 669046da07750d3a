"""Who may replace or write an output directory: ownership by manifest, input overlap, one job per output.

Every samoe command that writes a directory goes through this module, so the rules live in one place:

* **Ownership by manifest.** samoe's marker `.samoe-owner.json` lists every entry samoe made in the
  folder (relative name, kind, size). It is written *first*, when the folder is made, and each entry
  is recorded *before* the entry is created, so an interrupted command leaves only recorded entries.
  `--force` removes exactly the recorded entries and nothing else; a folder holding anything that is
  not recorded (a user's file, a link or FIFO where samoe made a file) is refused, naming the first
  such entry, before anything is deleted. A checkpoint written before markers existed is described
  by its `samoe.json` (the files it lists, with their sizes).
* **Temporaries by token.** A writer draws a random token, records it (in the manifest of the folder
  it writes, or of the temporary folder it makes beside the output) and names its temporaries
  `.NAME.tmp-TOKEN`. A leftover is removed only when its token is recorded there: never by name alone.
* **Never its own input.** An output that is, contains or lies inside one of the command's inputs
  (compared by `st_dev`/`st_ino`, so links and bind mounts do not hide it) is refused before anything
  is deleted or written.
* **One job per output.** An exclusive `flock` (the `filelock` package, which opens with O_NOFOLLOW)
  on `.NAME.lock` beside the output, held for the whole command; the holder's pid is written to
  `.NAME.lock.pid` so a second job can name it. The kernel drops the lock when its process dies.

All access below an output goes through `upscale.dirfd.Dir`: relative to a directory descriptor,
never through a link.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .dirfd import Dir, new_token, temp_name
from .errors import SamoeError
from .safe_io import plain_name

OWNER_FILE = ".samoe-owner.json"
MANIFEST_FORMAT = "samoe-owner"
KINDS = ("file", "log", "dir", "owned")  # log: a file that grows (no size); owned: a folder with its own manifest
MAX_MARKER_BYTES = 16 * 1024**2
# A checkpoint written before markers existed is described by its own files (upscale/checkpoint.py's names).
_LEGACY_META, _LEGACY_INDEX, _LEGACY_FORMAT = "samoe.json", "model.safetensors.index.json", "samoe-checkpoint"


@dataclass
class Manifest:
    """What samoe recorded about a folder: the command, the writers' tokens, and every entry it made."""

    command: str
    tokens: list[str] = field(default_factory=list)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative POSIX path -> {"kind", "size"?}

    def to_bytes(self) -> bytes:
        from . import __version__

        doc = {"format": MANIFEST_FORMAT, "written_by": f"samoe {self.command}", "command": self.command,
               "samoe": __version__, "tokens": self.tokens, "entries": dict(sorted(self.entries.items()))}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def is_temporary(self, name: str) -> bool:
        """`name` is a temporary of a writer whose token this manifest recorded."""
        _, sep, token = name.rpartition(".tmp-")
        return bool(sep) and name.startswith(".") and token in self.tokens


def _valid_rel(rel: Any) -> bool:
    return isinstance(rel, str) and all(plain_name(part) for part in rel.split("/"))


def read_manifest(d: Dir) -> Manifest | None:
    """The manifest of folder `d`: its marker, or the file list of a checkpoint older than markers; else None.

    An unreadable, oversized or malformed marker is no manifest: such a folder is not samoe's to delete."""
    try:
        if d.kind(OWNER_FILE) is not None:
            doc = d.read_json(OWNER_FILE, MAX_MARKER_BYTES)
            entries, tokens = doc.get("entries"), doc.get("tokens")
            if (doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("command"), str)
                    or not isinstance(entries, dict) or not isinstance(tokens, list)
                    or not all(isinstance(t, str) and t for t in tokens)
                    or not all(_valid_rel(k) and isinstance(v, dict) and v.get("kind") in KINDS for k, v in entries.items())):
                return None
            return Manifest(doc["command"], list(tokens), dict(entries))
        if d.kind(_LEGACY_META) == "file":
            meta = d.read_json(_LEGACY_META)
            files = meta.get("files") if isinstance(meta, dict) and meta.get("format") == _LEGACY_FORMAT else None
            if not isinstance(files, dict) or not all(plain_name(k) and isinstance(v, dict) for k, v in files.items()):
                return None
            entries = {name: {"kind": "file", "size": info.get("bytes")} for name, info in files.items()}
            entries[_LEGACY_META] = {"kind": "file"}
            entries[_LEGACY_INDEX] = {"kind": "file"}
            return Manifest("checkpoint", [], entries)
    except SamoeError:
        return None
    return None


_ON_DISK = {"file": "file", "log": "file", "dir": "dir", "owned": "dir"}  # recorded kind -> what lstat must show


def first_unknown(d: Dir, manifest: Manifest, prefix: str = "") -> str | None:
    """The first entry under `d` (relative path) that `manifest` does not record as what is there, or None.

    Recorded entries that are missing are fine (a command may have stopped before making them); a recorded
    name holding another kind of thing (a link or FIFO where samoe made a file) is unknown. A recorded folder
    is searched with this manifest, an owned one (a checkpoint inside a run) with its own."""
    for name in d.names():
        rel = prefix + name
        if (not prefix and name == OWNER_FILE) or manifest.is_temporary(name):
            continue
        entry = manifest.entries.get(rel)
        if entry is None or d.kind(name) != _ON_DISK[entry["kind"]]:
            return rel
        if entry["kind"] in ("file", "log"):
            continue
        with d.sub(name) as sub:
            if entry["kind"] == "dir":
                inner = first_unknown(sub, manifest, rel + "/")
            else:
                own = read_manifest(sub)
                if own is None:
                    return rel
                inner = first_unknown(sub, own)
                inner = None if inner is None else f"{rel}/{inner}"
        if inner is not None:
            return inner
    return None


def remove_recorded(d: Dir, manifest: Manifest, prefix: str = "") -> None:
    """Remove every recorded entry under `d` and the recorded writers' temporaries, then the marker.

    Call only after `first_unknown` found nothing: what is left afterwards is an empty folder."""
    for name in d.names():
        rel = prefix + name
        if not prefix and name == OWNER_FILE:
            continue
        if manifest.is_temporary(name):
            d.remove_tree(name)
            continue
        entry = manifest.entries.get(rel)
        if entry is None:
            continue
        if entry["kind"] in ("file", "log"):
            d.unlink(name, missing_ok=True)
        else:
            with d.sub(name) as sub:
                own = manifest if entry["kind"] == "dir" else read_manifest(sub)
                if own is not None:
                    remove_recorded(sub, own, rel + "/" if entry["kind"] == "dir" else "")
            d.rmdir(name)
    if not prefix:
        d.unlink(OWNER_FILE, missing_ok=True)


def unknown_error(path: Path, unknown: str, option: str) -> SamoeError:
    return SamoeError(f"{path} holds {unknown}, which samoe did not write (or not as it is now): refusing to delete or "
                      f"write into {path} even with --force; move it away or choose another {option}")


def not_ours_error(path: Path, option: str) -> SamoeError:
    return SamoeError(f"{path} was not written by samoe (no readable {OWNER_FILE} listing its files): refusing to "
                      f"delete or write into it even with --force; choose another {option}")


def check_owned(d: Dir, option: str) -> Manifest:
    """The manifest of a folder samoe may replace, or a refusal naming why."""
    manifest = read_manifest(d)
    if manifest is None:
        raise not_ours_error(d.path, option)
    unknown = first_unknown(d, manifest)
    if unknown is not None:
        raise unknown_error(d.path, unknown, option)
    return manifest


class Owned:
    """A folder samoe writes in place: its manifest is saved before each new entry is made.

    The token drawn here names this writer's temporaries (`temp`) and is recorded in the manifest first,
    so an interrupted writer's leftovers are recognised (and removed) by the next one."""

    def __init__(self, d: Dir, manifest: Manifest, token: str | None = None) -> None:
        self.dir, self.manifest = d, manifest
        self.token = token or new_token()
        if self.token not in manifest.tokens:
            manifest.tokens.append(self.token)
        self.save()

    @classmethod
    def start(cls, d: Dir, command: str, token: str | None = None) -> "Owned":
        """Take an empty folder: its marker is the first thing written into it."""
        return cls(d, Manifest(command), token)

    def temp(self, name: str) -> str:
        return temp_name(name, self.token)

    def record(self, *paths: str, kind: str = "file", size: int | None = None, save: bool = True) -> None:
        """Record entries (relative POSIX paths) before making them."""
        assert kind in KINDS
        for rel in paths:
            assert _valid_rel(rel), rel
            self.manifest.entries[rel] = {"kind": kind} if size is None else {"kind": kind, "size": size}
        if save:
            self.save()

    def recorded(self, rel: str) -> dict[str, Any] | None:
        return self.manifest.entries.get(rel)

    def forget(self, *paths: str, save: bool = True) -> None:
        """Drop entries (and everything recorded below them) once they are removed."""
        for rel in paths:
            for key in [k for k in self.manifest.entries if k == rel or k.startswith(rel + "/")]:
                del self.manifest.entries[key]
        if save:
            self.save()

    def save(self) -> None:
        self.dir.write_bytes(OWNER_FILE, self.manifest.to_bytes(), self.token)

    def discard(self, folder: bool = True) -> None:
        """Remove everything recorded (the marker too), then the folder itself when `folder` (one this command
        made and gave up on: a refused or failed command leaves nothing)."""
        remove_recorded(self.dir, self.manifest)
        if folder:
            with Dir.open(self.dir.path.parent, self.dir.fix) as parent:
                parent.rmdir(self.dir.path.name)


def remove_temporaries(d: Dir, manifest: Manifest, prefix: str = "") -> None:
    """Remove the leftovers of killed writers (their tokens are recorded) from `d` and its recorded folders."""
    for name in d.names():
        if manifest.is_temporary(name):
            d.remove_tree(name)
        elif (manifest.entries.get(prefix + name) or {}).get("kind") == "dir" and d.kind(name) == "dir":
            with d.sub(name) as sub:
                remove_temporaries(sub, manifest, prefix + name + "/")


def open_output(path: Path, command: str, option: str, *, force: bool, resume: bool = False,
                replace: bool = False) -> Owned:
    """The output folder `path`, written in place: new, empty, or samoe's own.

    A non-empty folder is written into when `force` is given and samoe wrote it (any command: what it holds
    stays recorded, same names are replaced; with `replace`, what samoe recorded there is removed first), or
    when `resume` and it is this command's own (a resumable command continues it); else it is refused.
    Either way a folder holding anything unrecorded is refused, naming the entry, and leftovers of killed
    writers (their tokens recorded) are removed first."""
    path = Path(path)
    check_plain_path(path, option)
    fix = f"choose another {option}"
    with Dir.open(path.parent, fix, create=True) as parent:
        kind = parent.kind(path.name)
        if kind not in (None, "dir"):
            raise SamoeError(f"{path} exists and is not a directory (a {kind}): samoe never writes through it; {fix}")
        d = parent.sub(path.name, create=True)
    try:
        if not d.names():
            return Owned.start(d, command)
        manifest = read_manifest(d)
        if manifest is None:
            raise not_ours_error(path, option)
        unknown = first_unknown(d, manifest)
        if unknown is not None:
            raise unknown_error(path, unknown, option)
        if force and replace:
            remove_recorded(d, manifest)
            return Owned.start(d, command)
        if force or (resume and manifest.command == command):
            remove_temporaries(d, manifest)
            return Owned(d, manifest)
        if resume:
            raise SamoeError(f"{path} was written by samoe {manifest.command}, not samoe {command}: {fix}")
        raise SamoeError(f"{path} already exists and is not empty: {fix} or pass --force to replace what samoe wrote there")
    except BaseException:
        d.close()
        raise


def check_replaceable(parent: Dir, out: Path, force: bool, option: str = "--out") -> None:
    """Refuse an existing `out` (in open folder `parent`) unless `force` and samoe wrote everything in it."""
    kind = parent.kind(out.name)
    if kind is None:
        return
    if not force:
        raise SamoeError(f"{out} already exists: choose another {option} or pass --force to replace it")
    if kind != "dir":
        raise SamoeError(f"{out} is not a directory samoe wrote (a {kind}): refusing to replace it even with "
                         f"--force; choose another {option}")
    with parent.sub(out.name) as d:
        if d.names():
            check_owned(d, option)


def preflight_new_output(out: Path, force: bool, option: str = "--out") -> None:
    """NewOutput's refusals, checked early (before a command's slow imports); NewOutput checks again when it runs."""
    out = Path(out)
    check_plain_path(out, option)
    if not out.parent.is_dir():
        return
    with Dir.open(out.parent, f"choose another {option}") as parent:
        check_replaceable(parent, out, force, option)


class NewOutput:
    """An output folder built under a temporary name beside its place and renamed into place when complete.

    The temporary `.NAME.tmp-TOKEN` carries its own manifest (written first, token recorded), so a
    killed writer's leftover is recognised by the next writer of NAME and removed by that manifest.
    Use as a context manager: an exception removes the temporary, so NAME is never half-written."""

    def __init__(self, out: Path, command: str, force: bool, option: str = "--out", parent: Dir | None = None) -> None:
        self.out = Path(out)
        check_plain_path(self.out, option)
        self.option = option
        self.parent = parent if parent is not None else Dir.open(self.out.parent, f"choose another {option}", create=True)
        self.name = self.out.name
        self.check_replaceable(force)
        remove_stale(self.parent, self.name)
        self.token = new_token()
        self.tmp_name = temp_name(self.name, self.token)
        self.dir = self.parent.mkdir(self.tmp_name)
        self.owned = Owned.start(self.dir, command, self.token)

    def check_replaceable(self, force: bool) -> None:
        check_replaceable(self.parent, self.out, force, self.option)

    def __enter__(self) -> "NewOutput":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def commit(self) -> Path:
        """Move the finished temporary into place; a previous output is moved aside, then removed by its manifest."""
        self.dir.fsync()
        self.dir.close()
        old = None
        if self.parent.kind(self.name) is not None:
            with self.parent.sub(self.name) as d:
                empty = not d.names()
                if not empty:
                    manifest = check_owned(d, self.option)
                    if not manifest.tokens:  # a checkpoint older than markers: give it one, with a token
                        manifest = Owned(d, manifest, self.token).manifest
                    # named with a token its own manifest records, so a leftover is recognised (remove_stale)
                    old = f".{self.name}.old-{manifest.tokens[0]}"
            if empty:
                self.parent.rmdir(self.name)
            else:
                self.parent.replace(self.name, old)
        try:
            self.parent.replace(self.tmp_name, self.name)
        except BaseException:
            if old is not None:
                self.parent.replace(old, self.name)  # put the previous output back
            raise
        self.parent.fsync()
        if old is not None:
            remove_owned_folder(self.parent, old)
        return self.out

    def abort(self) -> None:
        self.dir.close()
        self.parent.remove_tree(self.tmp_name)  # our own temporary, made by mkdir above


def remove_owned_folder(parent: Dir, name: str) -> None:
    """Remove folder `name` of `parent` by its manifest (it must hold nothing unrecorded); then the folder."""
    with parent.sub(name) as d:
        manifest = read_manifest(d)
        if manifest is None or first_unknown(d, manifest) is not None:
            return  # not provably ours: left alone
        remove_recorded(d, manifest)
    parent.rmdir(name)


def remove_stale(parent: Dir, name: str) -> None:
    """Remove leftovers of interrupted writers of `name`: `.NAME.tmp-T` / `.NAME.old-T` folders whose own
    manifest records token T. Anything else with such a name is someone else's and stays."""
    for entry in parent.names():
        for kind in (".tmp-", ".old-"):
            head = f".{name}{kind}"
            if not entry.startswith(head) or parent.kind(entry) != "dir":
                continue
            token = entry[len(head):]
            with parent.sub(entry) as d:
                manifest = read_manifest(d)
                ours = manifest is not None and token in manifest.tokens and first_unknown(d, manifest) is None
            if ours:
                remove_owned_folder(parent, entry)


def check_plain_path(path: Path, option: str) -> None:
    """An output path samoe can name in one line: no newline or other control character."""
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise SamoeError(f"{option} {text!r} holds a newline or another control character: choose a plain name")


def _identities(path: Path | str) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `path` as the command will reach it (links followed) and of every folder above it."""
    resolved = Path(path).resolve()
    out = []
    for p in (resolved, *resolved.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


def check_separate(out: Path, option: str, inputs: Mapping[str, Path | str | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs.

    Compared by identity (`st_dev`, `st_ino`), so a link, a relative path or a bind mount cannot make an
    input look separate: replacing such an output would delete (or write into) the files the command reads."""
    out_chain = _identities(out)
    out_id = out_chain[0] if Path(out).exists() else None
    for name, value in inputs.items():
        if value is None:
            continue
        in_chain = _identities(value)
        in_id = in_chain[0] if Path(value).exists() else None
        if (out_id is not None and out_id in in_chain) or (in_id is not None and in_id in out_chain):
            raise SamoeError(f"{option} {out} overlaps {name} {value} (the same folder, or one inside the other): "
                             f"choose a separate {option}")


def lock_paths(path: Path) -> tuple[Path, Path]:
    """The lock file beside `path` and the sidecar holding its holder's pid."""
    p = Path(path).resolve()
    lock = p.parent / f".{p.name}.lock"
    return lock, lock.with_name(lock.name + ".pid")


@contextmanager
def exclusive(path: Path, option: str = "--out") -> Iterator[None]:
    """Hold the one-job lock of output `path` for the body; a second job fails at once naming the holder."""
    from filelock import FileLock, Timeout

    check_plain_path(Path(path), option)
    lock_path, pid_path = lock_paths(path)
    with Dir.open(lock_path.parent, f"choose another {option}", create=True) as parent:
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            try:
                pid = parent.read_bytes(pid_path.name, 64).decode("ascii", "replace").strip() or "unknown"
            except (OSError, SamoeError):
                pid = "unknown"
            raise SamoeError(f"{path} is in use by another samoe job (pid {pid}): wait for it to finish, "
                             f"or choose another {option}") from None
        try:
            parent.unlink(pid_path.name, missing_ok=True)
            with parent.create(pid_path.name) as f:
                f.write(f"{os.getpid()}\n".encode())
            yield
        finally:
            # Unlink while still holding: a waiter that opened the old inode sees it unlinked and retries.
            parent.unlink(pid_path.name, missing_ok=True)
            parent.unlink(lock_path.name, missing_ok=True)
            lock.release()
