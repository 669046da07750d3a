"""Output folders a command fills item by item and resumes: what an interrupted run leaves, and says it left."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def resumable_output(out: Path, items: str) -> Iterator[list[int]]:
    """Fill `out` (temporaries under `out/.partial`); yields a one-element count of the `items` finished.

    On a failure or Ctrl-C: a folder this run created and finished nothing in is removed; otherwise the
    exception's `samoe_left` says how many were written (the CLI prints it). `.partial` never stays.
    """
    created = not (out.exists() or out.is_symlink())
    done = [0]
    try:
        yield done
    except BaseException as e:
        if created and done[0] == 0:
            shutil.rmtree(out, ignore_errors=True)
        elif isinstance(e, Exception | KeyboardInterrupt):
            e.samoe_left = f"{done[0]} {items} were written to {out}; re-run the same command to finish"  # type: ignore[attr-defined]
        raise
    finally:
        shutil.rmtree(out / ".partial", ignore_errors=True)
