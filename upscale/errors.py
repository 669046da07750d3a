"""The one exception type that means "the user gave us something wrong".

The CLI turns a `SamoeError` into a single line on stderr and exit code 2; any
other exception is an internal failure (exit 1). Messages name the problem and
the fix, e.g. "shard model-00002-of-00003.safetensors is truncated (...): re-run
the command that wrote it".
"""


class SamoeError(Exception):
    """A bad input, option or file, reported to the user in one line (exit code 2)."""


class DataError(SamoeError, ValueError):
    """A data file or folder is missing, malformed or inconsistent (one line: what and the fix)."""
