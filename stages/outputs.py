"""Output folders a command fills item by item and resumes: what an interrupted run leaves, and says it left."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from upscale.ownership import Owned, open_output


@contextmanager
def resumable_output(out: Path, command: str, items: str, force: bool = False) -> Iterator[tuple[Owned, list[int]]]:
    """Open `out` for `command` and yield it with a one-element count of the `items` finished.

    `out` is new, empty, or this command's own (upscale.ownership.open_output: resumed; with `force`, what
    samoe recorded there is replaced). Every entry is recorded before it is made, so what a failure, Ctrl-C
    or SIGTERM leaves is the same command's to resume: a folder this run created and finished nothing in
    is removed (by its manifest); otherwise the exception's `samoe_left` says how many were written.
    """
    created = not (out.exists() or out.is_symlink())
    target = open_output(out, command, "--out", force=force, resume=True, replace=True)
    done = [0]
    try:
        yield target, done
    except BaseException as e:
        if created and done[0] == 0:
            target.discard()
        elif isinstance(e, Exception | KeyboardInterrupt):
            e.samoe_left = f"{done[0]} {items} were written to {out}; re-run the same command to finish"  # type: ignore[attr-defined]
        raise
    finally:
        target.dir.close()
