"""Checkpoint and run directories are untrusted input (issue 15, part A).

Oracles: a marker file that a planted pickle would create (it must not exist
after the command), the exit-code contract (bad input: exit 2, exactly one
`error:` line on stderr naming the file), and, for genuine files, the weights
of an uninterrupted run (a DCP step written here must resume to them).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cli
from stages.data import make_demo_data
from upscale.checkpoint import Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def samoe(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def one_error_line(res, *words: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout[-500:], res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    for w in words:
        assert w in lines[0], res.stderr
    return lines[0]


# --------------------------------------------------------------------------- a run stopped after step 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "demo"
    make_demo_data(out, labelled=4, unlabelled=0, test=0, size=128, seed=0)
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    src = init_from_preset(PRESETS["tiny"], tmp_path_factory.mktemp("src") / "tiny", 0, torch.float32, ["test"], False)
    spec = GrowthSpec(experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=0, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


def train_args(grown: Path, data: Path, run: Path) -> list:
    return ["train", "--stage", 1, "--from", grown, "--data", data / "A", "--run-dir", run, "--batch-size", 4,
            "--max-steps", 2, "--checkpoint-every", 1]


@pytest.fixture(scope="module")
def finished(grown: Path, data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 2-step run with a step-1 checkpoint."""
    run = tmp_path_factory.mktemp("runs") / "done"
    res = samoe(*train_args(grown, data, run))
    assert res.exit_code == 0, res.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-1"
    return run


@pytest.fixture
def stopped(finished: Path, tmp_path: Path) -> Path:
    """What a run killed right after writing its step-1 checkpoint leaves (the engine truncates the logs itself)."""
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(run / "final")
    return run


def step1(run: Path) -> Path:
    return run / "checkpoints" / "step-1"


# --------------------------------------------------------------------------- case 1: no code runs on resume


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_dcp_pickle_does_not_run_on_resume(grown, data, stopped, tmp_path):
    marker = tmp_path / "pwned"
    (step1(stopped) / "dcp").mkdir()
    (step1(stopped) / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    res = samoe(*train_args(grown, data, stopped))
    assert not marker.exists(), "a pickle planted in the run directory ran"
    one_error_line(res, ".metadata", "posix.system", "loads no code", "--run-dir")


def test_planted_pickle_inside_real_metadata_is_refused(tmp_path):
    """A global hidden deep inside otherwise genuine DCP metadata is refused too (not only at the top)."""
    import torch.distributed.checkpoint as dcp

    from stages.dcp_safe import read_metadata
    from upscale.errors import SamoeError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.ones(3)}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    md = pickle.loads((tmp_path / "c" / ".metadata").read_bytes())
    marker = tmp_path / "pwned"
    md.planner_data = {"a": _Evil(marker)}
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(SamoeError, match="names posix.system"):
        read_metadata(tmp_path / "c")
    assert not marker.exists()


def _to_dcp(step: Path) -> None:
    """Rewrite a one-process step checkpoint as the DCP step a distributed run writes (same tensors)."""
    import torch.distributed.checkpoint as dcp

    model = dict(Checkpoint.open(step / "model").iter_tensors())
    optim = load_file(str(step / "optimizer.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(step / "dcp"), no_dist=True)
    shutil.rmtree(step / "model")
    (step / "optimizer.safetensors").unlink()
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps(dict(state, format="dcp", world_size=1)))


def test_genuine_dcp_step_resumes_to_the_uninterrupted_weights(grown, data, finished, stopped):
    _to_dcp(step1(stopped))
    res = samoe(*train_args(grown, data, stopped))
    assert res.exit_code == 0, res.stderr
    a = dict(Checkpoint.open(finished / "final").iter_tensors())
    b = dict(Checkpoint.open(stopped / "final").iter_tensors())
    assert set(a) == set(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_dcp_data_file_outside_the_step_is_refused(grown, data, stopped):
    _to_dcp(step1(stopped))
    meta_path = step1(stopped) / "dcp" / ".metadata"
    md = pickle.loads(meta_path.read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../../../../../../etc/passwd"
    meta_path.write_bytes(pickle.dumps(md))
    one_error_line(samoe(*train_args(grown, data, stopped)), ".metadata", "plain file name")


def test_dcp_metadata_declaring_huge_optimizer_state_is_refused(grown, data, stopped):
    """A declared size is never allocated: only sizes matching the parameter (or scalars) are accepted."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    _to_dcp(step1(stopped))
    meta_path = step1(stopped) / "dcp" / ".metadata"
    md = pickle.loads(meta_path.read_bytes())
    key = next(k for k in md.state_dict_metadata if k.startswith("optim.") and len(md.state_dict_metadata[k].size) == 2)
    big = torch.Size([1 << 20, 1 << 20])
    md.state_dict_metadata[key].size = big
    md.state_dict_metadata[key].chunks = [ChunkStorageMetadata(torch.Size([0, 0]), big)]
    meta_path.write_bytes(pickle.dumps(md))
    one_error_line(samoe(*train_args(grown, data, stopped)), "optimizer state")
