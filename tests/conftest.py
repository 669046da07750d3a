"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each worker, and every samoe process it starts, single-threaded, so
    # workers never fight each other for cores (tiny models run fastest single-threaded anyway)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (and never fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Demo data: 8 labelled (A), 8 unlabelled (B), 4 held-out (A-test) 128 px images."""
    from stages.data import make_demo_data

    out = tmp_path_factory.mktemp("data") / "demo"
    make_demo_data(out, labelled=8, unlabelled=8, test=4, size=128, seed=0)
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A fresh tiny source checkpoint."""
    from upscale.config import PRESETS
    from upscale.create import init_from_preset

    return init_from_preset(PRESETS["tiny"], tmp_path_factory.mktemp("src") / "tiny", 0, torch.float32, ["test"], False)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A fresh tiny checkpoint in one shard (for tests that damage copies of it)."""
    from upscale.config import PRESETS
    from upscale.create import init_from_preset

    return init_from_preset(PRESETS["tiny"], tmp_path_factory.mktemp("base") / "tiny", 0, torch.float32, ["test"], False)


@pytest.fixture(scope="module")
def multi(base: Path, tmp_path_factory) -> Path:
    """The same checkpoint in several shards with an index file."""
    from upscale import load_model, save_model
    from upscale.checkpoint import Checkpoint

    return save_model(load_model(base), tmp_path_factory.mktemp("multi") / "m", dict(Checkpoint.open(base).meta),
                      shard_bytes=200_000)


def one_error_line(res, *words: str, code: int = 2) -> str:
    """The CLI contract for bad input: exit `code`, exactly one `error:` line on stderr containing `words`, no
    traceback; returns the line."""
    assert res.exit_code == code, (res.exit_code, res.stdout[-500:], res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for w in words:
        assert w in lines[0], res.stderr
    return lines[0]
