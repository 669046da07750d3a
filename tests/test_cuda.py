"""GPU checks (`pytest -m cuda`; skipped without CUDA): what a one-GPU (or two-GPU) user runs.

Oracles: the per-expert reference computed in fp32 from the layer's own routing
(grouped GEMM vs loop), CUDA's sync debug mode (the MoE forward must not wait for
the host), the same training step on the CPU (fp32 close, bf16 within bf16's
accuracy), CPU evaluation and pseudo-labels of the same checkpoint, and the
one-GPU run for two NCCL processes (FSDP2). Everything uses the tiny preset.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli
from stages.data import read_mask
from stages.engine import TrainConfig, run
from upscale.checkpoint import Checkpoint
from upscale.config import MoEConfig
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.moe import MoEMLP

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 means fp32 in the comparisons with the CPU: PyTorch's default lets cuDNN convolutions use TF32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def grown(src: Path, tmp_path_factory) -> Path:
    spec = GrowthSpec(experts=12, groups=resolve_groups(4, 12, "3", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(path).iter_tensors())


# --------------------------------------------------------------------------- the MoE layer


def _layer(dtype: torch.dtype) -> MoEMLP:
    torch.manual_seed(0)
    m = MoEMLP(64, 256, MoEConfig(groups=(4, 3, 3, 2), core_groups=1, top_k=2, top_k_groups=1))
    with torch.no_grad():
        m.router.group_scale.uniform_(0.2, 0.8)
        m.router.group_gate.weight.normal_(0, 0.5)
    return m.to("cuda", dtype)


def _per_expert_reference(m: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """The layer's own assignments (token, expert, weight), each expert applied alone in fp32."""
    token, expert, weight = m.assignments
    banks = [(b, e) for b in m.experts for e in range(b.num_experts)]
    out = torch.zeros_like(x, dtype=torch.float32)
    xf = x.float()
    for e in expert.unique().tolist():
        bank, i = banks[e]
        sel = expert == e
        t = token[sel]
        h = bank.act(xf[t] @ bank.w1[i].float().t() + bank.b1[i].float())
        y = h @ bank.w2[i].float().t() + bank.b2[i].float()
        out.index_add_(0, t, y * weight[sel].float()[:, None])
    return out


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-autocast"])
def test_grouped_gemm_matches_per_expert_reference(autocast: bool):
    m = _layer(torch.float32 if autocast else torch.bfloat16)
    x = torch.randn(512, 64, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    calls = []
    real_mm = torch._grouped_mm

    def spy(a, b, **kw):
        calls.append((a.dtype, b.shape[0]))
        return real_mm(a, b, **kw)

    m.record = True
    torch._grouped_mm = spy
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
    finally:
        torch._grouped_mm = real_mm
    assert calls == [(torch.bfloat16, 12), (torch.bfloat16, 12)], "not one bf16 grouped GEMM over all 12 experts per linear"
    ref = _per_expert_reference(m, x.detach())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    # expert weight gradients depend on the routing weights' values only: the reference's must match
    gout = torch.randn_like(ref)
    banks = [m.experts[0].w1, m.experts[0].w2, m.experts[2].w1, m.experts[3].b2]
    got = torch.autograd.grad(y, banks, gout.to(y.dtype))
    want = torch.autograd.grad(ref, banks, gout, allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros_like(g, dtype=torch.float32) if w is None else w.float()
        assert w.abs().sum() > 0, "test setup: a bank without tokens"
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2 * float(w.abs().max()))


def test_moe_forward_never_waits_for_the_host():
    """CUDA's sync debug mode raises on any device->host wait (.tolist, .item, nonzero, bincount, ...)."""
    for autocast, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        m = _layer(dtype)
        x = torch.randn(4, 128, 64, device="cuda", dtype=dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            m(x)  # first call: per-device index tensors are copied once
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = m(x)
                aux = m.aux_loss + m.handover_loss
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(y.float()).all() and torch.isfinite(aux)


def test_layer_without_tokens_on_gpu():
    m = _layer(torch.bfloat16)
    y = m(torch.zeros(0, 64, device="cuda", dtype=torch.bfloat16))
    assert y.shape == (0, 64)


# --------------------------------------------------------------------------- training on one GPU


def _train(grown: Path, data: Path, run_dir: Path, device: str, precision: str, steps: int = 2) -> Path:
    cfg = TrainConfig(stage=1, source=str(grown), run_dir=str(run_dir), data=str(data / "A"), unlabelled=str(data / "B"),
                      max_steps=steps, batch_size=4, checkpoint_every=1, device=device, precision=precision)
    return run(cfg)


@pytest.fixture(scope="module")
def cpu_run(grown: Path, data: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cpu") / "run"
    _train(grown, data, run_dir, "cpu", "fp32")
    return run_dir


@pytest.mark.parametrize("precision,rel", [("fp32", 5e-3), ("bf16", 5e-2)])
def test_one_gpu_training_steps(grown: Path, data: Path, cpu_run: Path, tmp_path: Path, precision: str, rel: float, no_tf32):
    final = _train(grown, data, tmp_path / "run", "cuda", precision)
    rows, ref = _rows(tmp_path / "run"), _rows(cpu_run)
    assert [r["step"] for r in rows] == ["1", "2"]
    for k in ("loss", "loss_sup", "loss_unsup", "seg", "sdf", "boundary"):
        assert np.isfinite(float(rows[0][k]))
        assert float(rows[0][k]) == pytest.approx(float(ref[0][k]), rel=rel, abs=1e-4), (k, rows[0][k], ref[0][k])
    before, after = _tensors(grown), _tensors(final)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(".experts.1." in n for n in changed) and any("group_scale" in n or "group_gate" in n for n in changed)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all() for t in after.values())
    # the run resumes on the GPU from its own step checkpoint
    res = CliRunner().invoke(cli.app, ["train", "--stage", "1", "--lr", "0.01", "--from", str(grown), "--run-dir", str(tmp_path / "run"),
                                       "--data", str(data / "A"), "--unlabelled", str(data / "B"), "--max-steps", "2",
                                       "--batch-size", "4", "--checkpoint-every", "1", "--device", "cuda", "--precision", precision])
    assert res.exit_code == 2 and "already finished" in res.stderr


# --------------------------------------------------------------------------- eval, pseudo-label, verify


def test_eval_pseudo_label_and_verify_on_gpu(src: Path, grown: Path, data: Path, tmp_path: Path, no_tf32):
    reports = {}
    for device in ("cpu", "cuda"):
        res = CliRunner().invoke(cli.app, ["eval", str(grown), "--data", str(data / "A-test"), "--bootstrap", "10",
                                           "--device", device, "--json"])
        assert res.exit_code == 0, res.stderr
        reports[device] = json.loads(res.stdout)["checkpoints"][0]
    for m in ("miou", "pixel_accuracy", "boundary_f1", "sdf_mae"):
        assert reports["cuda"]["metrics"][m] == pytest.approx(reports["cpu"]["metrics"][m], abs=1e-2), m
    for device in ("cpu", "cuda"):
        res = CliRunner().invoke(cli.app, ["pseudo-label", str(grown), "--images", str(data / "B"),
                                           "--out", str(tmp_path / f"p-{device}"), "--device", device])
        assert res.exit_code == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "p-cpu" / "masks").iterdir())
    agree = np.mean([(read_mask(tmp_path / "p-cpu" / "masks" / n) == read_mask(tmp_path / "p-cuda" / "masks" / n)).mean()
                     for n in names])
    assert agree > 0.99, agree
    res = CliRunner().invoke(cli.app, ["expand", str(src), "--out", str(tmp_path / "g2"), "--experts", "16", "--groups", "4",
                                       "--noise-std", "0", "--verify", str(data / "A"), "--device", "cuda", "--json"])
    assert res.exit_code == 0, res.stderr
    verify = json.loads(res.stdout)["verify"]
    assert max(v["relative"] for v in verify.values()) < 1e-5, verify


# --------------------------------------------------------------------------- two GPUs: NCCL + FSDP2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_nccl_equal_one_gpu(grown: Path, data: Path, tmp_path: Path, no_tf32):
    one = tmp_path / "one"
    _train(grown, data, one, "cuda", "fp32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SAMOE_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "cli",
           "train", "--stage", "1", "--lr", "0.01", "--from", str(grown), "--run-dir", str(tmp_path / "two"), "--data", str(data / "A"),
           "--unlabelled", str(data / "B"), "--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "1",
           "--device", "cuda"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    for x, y in zip(_rows(one), _rows(tmp_path / "two")):
        for k in ("loss", "seg", "sdf", "boundary", "aux"):
            assert float(y[k]) == pytest.approx(float(x[k]), rel=5e-3, abs=1e-5), (k, x[k], y[k])
