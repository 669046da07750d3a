"""Environment faults: a full disk mid-write gives one line, exit 2, and leaves nothing behind."""

import errno
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
import upscale.checkpoint as ckpt_mod
from upscale.config import PRESETS
from upscale.create import init_from_preset

pytestmark = pytest.mark.usefixtures("one_thread")


def _disk_fills_after(monkeypatch, writes: int) -> None:
    real = ckpt_mod.CheckpointWriter._write
    count = [0]

    def write(self, data):
        count[0] += 1
        if count[0] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ckpt_mod.CheckpointWriter, "_write", write)


def _check_failed_cleanly(result, out: Path) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), result.stderr
    assert "free space" in lines[0] and "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.mark.parametrize("writes", [0, 5])
def test_disk_full_during_init(tmp_path, monkeypatch, writes):
    _disk_fills_after(monkeypatch, writes)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["init", "--preset", "tiny", "--out", str(out)])
    _check_failed_cleanly(result, out)


def test_disk_full_during_expand_keeps_source(tmp_path, monkeypatch):
    src = init_from_preset(PRESETS["tiny"], tmp_path / "src", 0, torch.float32, ["test"], False)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    _disk_fills_after(monkeypatch, 20)
    out = tmp_path / "grown"
    result = CliRunner().invoke(cli.app, ["expand", str(src), "--out", str(out), "--experts", "8", "--groups", "2"])
    _check_failed_cleanly(result, out)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
