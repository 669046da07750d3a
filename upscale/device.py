"""Where samoe computes and in which precision: the `--device` and `--precision` options.

`--device auto|cpu|cuda|cuda:N` (auto = the current CUDA device when one is
visible, else the CPU) and `--precision fp32|bf16` mean the same for `train`,
`eval`, `pseudo-label` and `expand --verify`. bf16 is autocast on one device
(CUDA, or the CPU's bf16 kernels) with fp32 weights, gradients and optimizer
state (in training, expert banks are stored in bf16 beside fp32 masters, which
computes the same numbers without casting every bank each step: stages/master.py);
under torchrun it is FSDP2's MixedPrecisionPolicy (bf16 compute, fp32
gradient reduction) instead (stages/distributed.py).

What each device promises:
- CPU, fp32: bit-exact. Training runs under PyTorch's deterministic algorithms
  (scoped to the run, see `deterministic`), so a resumed run reproduces an
  uninterrupted one bit for bit, for the same thread count.
- CUDA: the same seeds, data order, schedules and resume points, but not
  bit-exact: index_add/scatter use atomics and cuBLAS picks kernels per shape,
  so two runs (or a run and its resumed copy) agree to float rounding only.
  fp32 keeps PyTorch's defaults (cuDNN convolutions may use TF32); the CUDA
  tests hold a one-GPU fp32 step's losses to 5e-3 relative of the CPU step's,
  and a bf16 step's to 5e-2.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator

import torch

from .errors import SamoeError

PRECISIONS = ("fp32", "bf16")

def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device for a `--device` value; a missing GPU is one line naming the fix."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d{1,4}))?", spec)
    if m is None:
        raise SamoeError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise SamoeError(f"--device {spec}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
                         "use --device cpu or --device auto")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise SamoeError(f"--device {spec}: only {count} GPU(s) are visible (cuda:0..cuda:{count - 1}); pick one of them")
    return torch.device("cuda", index)


def check_precision(precision: str) -> str:
    """A valid `--precision` value (fp32 or bf16)."""
    if precision not in PRECISIONS:
        raise SamoeError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The forward's compute precision: nothing for fp32, bf16 autocast on `device` for bf16."""
    if check_precision(precision) == "fp32" or device.type not in ("cpu", "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for one block only; the caller's setting comes back afterwards.

    Some CPU kernels reduce in an order that depends on threads and memory layout (runs differed by
    ~1e-11 in router tensors); their deterministic versions make CPU training, and so resume after a
    kill, bit-exact with any thread count. A library must not leave it switched on process-wide.
    """
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (non-blocking from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
