"""`--device` and `--precision` (upscale/device.py) on a machine without a GPU.

Oracles: where the engine really puts the model, each batch and the optimizer state
(resumed onto PyTorch's `meta` device, which stands in for a GPU here: a tensor left
on the CPU by mistake is caught); the CLI's one-line errors; the process-wide
deterministic setting before and after a run; bf16 autocast on CPU against fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
import stages.engine as engine
from stages.engine import TrainConfig
from upscale.device import autocast, deterministic, resolve_device
from upscale.errors import SamoeError
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups

pytestmark = pytest.mark.usefixtures("one_thread")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


@pytest.fixture(scope="module")
def grown(src: Path, tmp_path_factory) -> Path:
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


class _Stop(Exception):
    pass


def _stop_after_two(monkeypatch) -> None:
    """engine.train_step runs twice, then raises _Stop (a checkpoint every 2 steps is on disk by then)."""
    real_step, calls = engine.train_step, []

    def step(*a, **kw):
        if len(calls) == 2:
            raise _Stop
        calls.append(1)
        return real_step(*a, **kw)

    monkeypatch.setattr(engine, "train_step", step)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(SamoeError, match="--device cpu"):
        resolve_device("cuda")
    with pytest.raises(SamoeError, match="not one of"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SamoeError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_deterministic_is_scoped():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert before == (False, False)
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
    torch.use_deterministic_algorithms(True)  # a caller's own setting survives a run that switches it
    try:
        with deterministic(True):
            pass
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    from upscale.checkpoint import Checkpoint

    return dict(Checkpoint.open(run / "final").iter_tensors())


def _cfg(grown: Path, data: Path, run: Path, **kw) -> TrainConfig:
    kw = {"stage": 1, "max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "lr": 0.01, **kw}
    return TrainConfig(source=str(grown), run_dir=str(run), data=str(data / "A"), unlabelled=str(data / "B"), **kw)


def test_model_batch_and_optimizer_state_land_on_the_device(grown: Path, data: Path, tmp_path: Path, monkeypatch):
    """Run 2 steps on the CPU, stop, resume onto `meta`: every tensor the step touches must be there."""
    run = tmp_path / "run"
    _stop_after_two(monkeypatch)
    with pytest.raises(_Stop):
        engine.run(_cfg(grown, data, run, device="cpu"))
    assert (run / "checkpoints" / "step-2").is_dir()
    assert not torch.are_deterministic_algorithms_enabled(), "the CPU run left deterministic algorithms on"

    seen = {}

    def record(model, opts, batch, ubatch, *a, **kw):
        seen["params"] = {p.device.type for p in model.parameters()}
        seen["buffers"] = {b.device.type for b in model.buffers()}
        seen["batch"] = {v.device.type for b in (batch, ubatch) for v in b.values() if torch.is_tensor(v)}
        seen["state"] = {v.device.type for opt in opts.named().values() for st in opt.state.values()
                         for v in st.values() if torch.is_tensor(v) and v.dim()}
        seen["states"] = sum(len(opt.state) for opt in opts.named().values())
        raise _Stop

    monkeypatch.setattr(engine, "train_step", record)
    monkeypatch.setattr(engine, "resolve_device", lambda spec: torch.device("meta"))
    with pytest.raises(_Stop):
        engine.run(_cfg(grown, data, run, device="cuda"))
    assert seen["states"] > 0, "resume installed no optimizer state"
    assert seen["params"] == seen["buffers"] == seen["batch"] == seen["state"] == {"meta"}, seen


@no_cuda
@pytest.mark.parametrize("command", ["train", "eval", "pseudo-label", "expand"])
def test_cuda_without_a_gpu_is_one_line(src: Path, grown: Path, data: Path, tmp_path: Path, command: str):
    args = {
        "train": ["train", "--stage", "1", "--set", "lr=0.01", "--from", grown, "--run-dir", tmp_path / "r", "--data", data / "A", "--set", "max_steps=1"],
        "eval": ["eval", grown, "--data", data / "A-test"],
        "pseudo-label": ["pseudo-label", grown, "--images", data / "B", "--out", tmp_path / "p"],
        "expand": ["expand", src, "--out", tmp_path / "e", "--experts", "12", "--groups", "3", "--verify", data / "A"],
    }[command]
    res = CliRunner().invoke(cli.app, [*map(str, args), "--device", "cuda"])
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "--device cpu" in lines[0], res.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_precision_options(grown: Path, data: Path, tmp_path: Path):
    base = ["train", "--stage", "1", "--set", "lr=0.01", "--from", str(grown), "--data", str(data / "A"), "--set", "max_steps=1"]
    res = CliRunner().invoke(cli.app, [*base, "--run-dir", str(tmp_path / "a"), "--set", "precision=fp16"])
    assert res.exit_code == 2 and "precision = 'fp16'" in res.stderr and not (tmp_path / "a").exists()
    res = CliRunner().invoke(cli.app, [*base, "--run-dir", str(tmp_path / "c"), "--nproc", "2", "--device", "cuda:1"])
    assert res.exit_code == 2 and "--device cuda" in res.stderr


@pytest.mark.slow  # 5 s: two training runs
def test_cpu_bf16_training_step_is_close_to_fp32(grown: Path, data: Path, tmp_path: Path):
    """`--precision bf16` on the CPU: autocast, fp32 weights; the losses track fp32's to bf16 accuracy."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(grown, data, tmp_path / precision, device="cpu", precision=precision, max_steps=2)
        engine.run(cfg)
        with open(tmp_path / precision / "metrics.csv") as f:
            import csv

            runs[precision] = list(csv.DictReader(f))
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=3e-2)
        assert float(b["loss"]) != float(a["loss"]), "bf16 computed exactly what fp32 did: autocast was not on"
    final = _final_tensors(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in final.values() if t.is_floating_point())


def test_autocast_context():
    assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.slow  # 16 s: two training runs compared step by step
def test_bf16_banks_with_fp32_masters_train_exactly_as_autocast(grown: Path, data: Path, tmp_path: Path, monkeypatch):
    """`--precision bf16` stores expert banks in bf16 with fp32 masters (stages/master.py). The oracle is
    plain autocast over fp32 banks (the masters switched off): the same weights, bit for bit, after 4 steps
    of stage 1 (new banks train, the source's are frozen; both phases), and an interrupted run resumed from
    its step-2 checkpoint agrees too. Frozen banks come out as they went in: masters are saved, not their
    bf16 copies."""
    seen = []
    real_step = engine.train_step

    def spy(model, *a, **kw):
        seen.append({p.dtype for n, p in model.named_parameters() if ".experts." in n})
        return real_step(model, *a, **kw)

    monkeypatch.setattr(engine, "train_step", spy)
    cfg = dict(device="cpu", precision="bf16")
    engine.run(_cfg(grown, data, tmp_path / "masters", **cfg))
    assert seen and all(s == {torch.bfloat16} for s in seen), "the banks were not stored in bf16 during the steps"
    with monkeypatch.context() as m:
        m.setattr(engine._Trainer, "store_banks_low", lambda self: None)
        engine.run(_cfg(grown, data, tmp_path / "autocast", **cfg))
    masters, plain = _final_tensors(tmp_path / "masters"), _final_tensors(tmp_path / "autocast")
    assert all(t.dtype == torch.float32 for t in masters.values() if t.is_floating_point())
    src = dict(engine.Checkpoint.open(grown).iter_tensors())
    banks = [n for n in masters if ".experts." in n]
    moved = [n for n in banks if not torch.equal(masters[n], src[n])]
    assert moved, "no expert bank changed: the comparison would prove nothing"
    assert len(moved) < len(banks), "every bank changed: frozen banks lost their fp32 values (bf16 copies saved?)"
    assert masters.keys() == plain.keys()
    assert all(torch.equal(masters[n], plain[n]) for n in masters), \
        [n for n in masters if not torch.equal(masters[n], plain[n])][:5]

    _stop_after_two(monkeypatch)
    with pytest.raises(_Stop):
        engine.run(_cfg(grown, data, tmp_path / "resumed", **cfg))
    monkeypatch.setattr(engine, "train_step", real_step)
    engine.run(_cfg(grown, data, tmp_path / "resumed", **cfg))
    resumed = _final_tensors(tmp_path / "resumed")
    assert all(torch.equal(masters[n], resumed[n]) for n in masters), \
        [n for n in masters if not torch.equal(masters[n], resumed[n])][:5]
