"""Sharded (FSDP2) training on CPU with the gloo backend: 2 processes against 1.

Oracles: a single process with the same global batch (losses of every step,
final weights), the grown checkpoint (frozen tensors bit for bit after a
2-process stage 1), and, for the MoE corner case that the end-to-end runs
cannot force (an expert group that receives tokens in one process and none in
the other), the gradients of a plain MoE layer on the whole batch.

Resume across world sizes: an uninterrupted 6-step run with a step checkpoint
at step 3 is copied; the copy loses `final/` and its metric rows after step 3,
which is exactly what a run killed after writing step-3 leaves behind (the
engine resumes from `latest` and truncates the logs itself). Re-running the
same command on 1 or 2 processes must reach the uninterrupted final weights.
Processes start through `torchrun -m cli` and through `samoe train --nproc 2`.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli
from stages.distributed import exit_worker
from upscale.checkpoint import Checkpoint, load_model
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups

SAMOE = Path(sys.executable).with_name("samoe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAMOE_DEVICE": "cpu", "COLUMNS": "120"}
LOSSES = ("loss", "loss_sup", "loss_unsup", "seg", "sdf", "boundary", "aux", "sigma_seg", "sigma_sdf", "sigma_boundary")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # torchrun: two processes per test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, script: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           *(script or ["-m", "cli", "train"]), *[str(a) for a in args]]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def train_1(*args) -> None:
    res = CliRunner().invoke(cli.app, ["train", *[str(a) for a in args]])
    assert res.exit_code == 0, res.stderr


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def same_losses(a: Path, b: Path, steps: int) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [str(i) for i in range(1, steps + 1)]
    for x, y in zip(ra, rb):
        for k in LOSSES:
            assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-5, abs=1e-7), (x["step"], k, x[k], y[k])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(Checkpoint.open(path).iter_tensors())


def close_weights(a: Path, b: Path, exact: bool = False) -> None:
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for n, t in ta.items():
        if exact:
            assert torch.equal(t, tb[n]), n
        else:
            assert torch.allclose(t, tb[n], rtol=1e-5, atol=1e-6), (n, (t - tb[n]).abs().max().item())


def stopped_copy(run: Path, out: Path, step: int) -> Path:
    """What a run killed right after writing its step-`step` checkpoint leaves on disk."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "final")
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    kept = [r for r in rows(out) if int(r["step"]) <= step]
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(kept[0]))
        w.writeheader()
        w.writerows(kept)
    return out


@pytest.fixture(scope="module")
def grown(src: Path, tmp_path_factory) -> Path:
    """The tiny preset grown to 12 experts in 3 groups (two routed groups) plus an extra block."""
    spec = GrowthSpec(experts=12, groups=resolve_groups(4, 12, "3", 1), extra_blocks=1, noise_std=0.01)
    return expand_checkpoint(src, tmp_path_factory.mktemp("grown") / "g", spec, ["test"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def stage1_args(grown: Path, data: Path) -> list:
    return ["--stage", 1, "--set", "lr=0.01", "--from", grown, "--data", data / "A", "--unlabelled", data / "B", "--set", "batch_size=4",
            "--set", "max_steps=6", "--set", "checkpoint_every=3"]


@pytest.fixture(scope="module")
def single_s1(grown: Path, data: Path, runs: Path) -> Path:
    train_1(*stage1_args(grown, data), "--run-dir", runs / "s1-one")
    return runs / "s1-one"


@pytest.fixture(scope="module")
def sharded_s1(grown: Path, data: Path, runs: Path) -> Path:
    torchrun(*stage1_args(grown, data), "--run-dir", runs / "s1-two")
    return runs / "s1-two"


# --------------------------------------------------------------------------- same losses as one process


def test_stage1_two_processes_match_one(single_s1: Path, sharded_s1: Path):
    same_losses(single_s1, sharded_s1, 6)
    close_weights(single_s1 / "final", sharded_s1 / "final")
    state = (sharded_s1 / "checkpoints" / "step-3" / "trainer_state.json").read_text()
    assert '"format": "dcp"' in state and '"world_size": 2' in state
    assert (sharded_s1 / "checkpoints" / "step-3" / "dcp" / ".metadata").is_file()


def test_stage1_frozen_tensors_bit_identical(grown: Path, sharded_s1: Path):
    prov = Checkpoint.open(grown).provenance
    before, after = tensors(grown), tensors(sharded_s1 / "final")
    params = {n for n, _ in load_model(grown).named_parameters()}  # the selector's alpha buffers follow the ramp
    frozen = [n for n in before if n in params and prov[n] == "source" and ".router." not in n]
    assert len(frozen) > 150
    assert not [n for n in frozen if not torch.equal(before[n], after[n])]
    trained = [n for n in before if prov[n] != "source" and before[n].is_floating_point()]
    assert trained and all(not torch.equal(before[n], after[n]) for n in trained)


def test_stage3_two_processes_match_one(grown: Path, data: Path, runs: Path):
    """Stage 3 (everything trains), batch 3 over 8 images: slices of 2+1 and a last batch of 1+1."""
    args = ["--stage", 3, "--set", "lr=0.01", "--skip-stage-check", "--from", grown, "--data", data / "A", "--unlabelled", data / "B",
            "--set", "batch_size=3", "--set", "max_steps=5"]
    train_1(*args, "--run-dir", runs / "s3-one")
    res = subprocess.run([str(SAMOE), "train", "--nproc", "2", *map(str, args), "--run-dir", str(runs / "s3-two")],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert res.stdout.count("done: ") == 1  # only rank 0 prints
    same_losses(runs / "s3-one", runs / "s3-two", 5)
    close_weights(runs / "s3-one" / "final", runs / "s3-two" / "final")


# --------------------------------------------------------------------------- resume with another world size


def test_two_process_checkpoint_resumes_on_one_and_two(grown: Path, data: Path, runs: Path, sharded_s1: Path):
    on_one = stopped_copy(sharded_s1, runs / "resume-1", 3)
    on_two = stopped_copy(sharded_s1, runs / "resume-2", 3)
    train_1(*stage1_args(grown, data), "--run-dir", on_one)
    torchrun(*stage1_args(grown, data), "--run-dir", on_two)
    close_weights(sharded_s1 / "final", on_one / "final")
    close_weights(sharded_s1 / "final", on_two / "final", exact=True)  # same world size: bit for bit
    same_losses(sharded_s1, on_one, 6)


def test_one_process_checkpoint_resumes_on_two(grown: Path, data: Path, runs: Path, single_s1: Path):
    on_two = stopped_copy(single_s1, runs / "resume-st", 3)
    assert (on_two / "checkpoints" / "step-3" / "optimizer.safetensors").is_file()
    torchrun(*stage1_args(grown, data), "--run-dir", on_two)
    close_weights(single_s1 / "final", on_two / "final")
    same_losses(single_s1, on_two, 6)


def test_mixed_precision(grown: Path, data: Path, runs: Path, single_s1: Path):
    """bf16 compute, fp32 reduction: close to the fp32 losses, weights stay in the checkpoint's dtype.

    precision bf16: FSDP2's policy under torchrun, autocast in one process."""
    args = ["--stage", 1, "--set", "lr=0.01", "--from", grown, "--data", data / "A", "--unlabelled", data / "B", "--set", "batch_size=4", "--set", "max_steps=2"]
    train_1(*args, "--run-dir", runs / "mp-one", "--set", "precision=bf16")
    torchrun(*args, "--run-dir", runs / "mp", "--set", "precision=bf16")
    for run in (runs / "mp", runs / "mp-one"):
        for x, y in zip(rows(single_s1)[:2], rows(run)):
            assert float(y["loss"]) == pytest.approx(float(x["loss"]), rel=1e-2)
        final = tensors(run / "final")
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values())


_SPY = """
import os, sys
from pathlib import Path

import stages.engine as engine

real = engine._prepare_run_dir
spy_dir = sys.argv[1]


def spy(*args, **kwargs):
    Path(spy_dir, "rank" + os.environ["RANK"]).touch()
    return real(*args, **kwargs)


engine._prepare_run_dir = spy
import cli

sys.argv = ["samoe", "train", *sys.argv[2:]]
cli.main()
"""


def test_force_only_rank0_touches_the_run_dir(grown: Path, data: Path, runs: Path, single_s1: Path, tmp_path: Path):
    """--force on a finished run: rank 0 alone inspects and deletes it, the others wait for its verdict."""
    run = runs / "force"
    shutil.copytree(single_s1, run)
    script = tmp_path / "spy.py"
    script.write_text(_SPY)
    args = ["--stage", 1, "--set", "lr=0.01", "--from", grown, "--data", data / "A", "--unlabelled", data / "B", "--set", "batch_size=4",
            "--set", "max_steps=2", "--run-dir", run, "--force"]
    for attempt in range(2):
        spy = tmp_path / f"spy{attempt}"
        spy.mkdir()
        torchrun(spy, *args, script=[str(script)])
        assert sorted(p.name for p in spy.iterdir()) == ["rank0"]
        assert [r["step"] for r in rows(run)] == ["1", "2"] and (run / "final" / "samoe.json").is_file()
    # a refusal reaches every rank as the same one line, exit 2 (not a hang)
    (run / "run.json").unlink()
    (run / "foreign.txt").write_text("not samoe's")
    (run / ".samoe-owner.json").unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "cli", "train", *map(str, args[:-1])]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0 and "not a samoe run directory" in res.stderr, res.stderr[-3000:]


# --------------------------------------------------------------------------- an expert group used by one process only


def _moe_worker() -> None:
    """Run under torchrun (2 processes): compare a sharded MoE layer with the same layer on the whole batch, its
    balance and hand-over losses included."""
    import copy

    from stages.distributed import Distributed
    from stages.optim import drop_idle_grads
    from upscale.config import MoEConfig
    from upscale.moe import MoEMLP

    torch.manual_seed(0)
    # core group + 3 routed groups; the group router sends tokens with x0 > 0 to routed group 0, x0 < 0 to
    # routed group 1, and nothing to routed group 2.
    ref = MoEMLP(8, 16, MoEConfig(groups=(2, 2, 2, 2), core_groups=1, top_k=1, top_k_groups=1))
    with torch.no_grad():
        ref.router.group_scale.fill_(0.5)  # a hand-over to balance (growth's 0 would make it constant)
        ref.router.group_gate.weight.zero_()
        ref.router.group_gate.weight[0, 0], ref.router.group_gate.weight[1, 0] = 5.0, -5.0
    x = torch.randn(12, 8)
    x[:6, 0] = x[:6, 0].abs() + 1
    x[6:, 0] = -(x[6:, 0].abs() + 1)

    single = copy.deepcopy(ref)
    y = single(x)
    loss_1 = y.pow(2).sum() / y.numel() + 0.5 * single.aux_loss + 0.3 * single.handover_loss
    assert single.handover_loss.item() > 0
    loss_1.backward()
    drop_idle_grads([single])
    want = {n: p.grad for n, p in single.named_parameters()}
    assert want["experts.3.w1"] is None and want["experts.1.w1"] is not None and want["experts.2.w1"] is not None

    d = Distributed()
    layer = copy.deepcopy(ref)
    d.shard_moe("moe", layer)
    rows = x[:6] if d.rank == 0 else x[6:]  # routed group 0 on rank 0 only, group 1 on rank 1 only
    y = layer(rows)
    (sums,), aux, handover = d.reduce_with_aux([torch.stack([y.pow(2).sum(), torch.tensor(float(y.numel()))])])
    loss_2 = sums[0] / sums[1] + 0.5 * aux + 0.3 * handover
    loss_2.backward()
    d.after_backward()
    got = {n: None if p.grad is None else p.grad.full_tensor() for n, p in layer.named_parameters()}
    if d.rank == 0:
        assert torch.allclose(loss_1, loss_2.detach(), rtol=1e-6), (loss_1.item(), loss_2.item())
        assert torch.allclose(single.handover_loss, handover.detach(), rtol=1e-6), (single.handover_loss, handover)
        for n, g in want.items():
            assert (g is None) == (got[n] is None), n
            if g is not None:
                assert torch.allclose(g, got[n], rtol=1e-5, atol=1e-7), (n, (g - got[n]).abs().max())
        print("moe-ok")
    d.close(finished=True)  # rank 1 must not tear gloo down while rank 0 still checks (an abort at exit)


def test_expert_group_used_by_one_process_only():
    res = torchrun(script=[__file__, "--moe-worker"])
    assert "moe-ok" in res.stdout


def _rows_worker(path: str) -> None:
    """Run under torchrun (2 processes): build the sharded model from `path`, count the bytes each rank reads."""
    import stages.distributed as sd
    from stages.distributed import Distributed

    read = []
    real = sd._read_rows

    def counting(f, info, lo, hi, where):
        t = real(f, info, lo, hi, where)
        read.append(t.numel() * t.element_size())
        return t

    sd._read_rows = counting
    d = Distributed()
    model, _ = d.build_model(path, lambda m: None)
    state = d.full_state_dict(model)
    total = sum(info.nbytes for info in Checkpoint.open(path).tensors.values())
    print(f"rank{d.rank} read {sum(read)} of {total}", flush=True)
    if d.rank == 0:
        want = dict(Checkpoint.open(path).iter_tensors())
        assert set(state) == set(want)
        for n, t in want.items():
            assert torch.equal(state[n], t), n
        print("rows-ok")
    d.close(finished=True)


def test_each_rank_reads_only_its_rows(grown: Path):
    """Two processes build the sharded model: together they read the checkpoint about once, not twice,
    and the gathered weights equal the checkpoint's bit for bit."""
    res = torchrun(script=[__file__, "--rows-worker", str(grown)])
    assert "rows-ok" in res.stdout
    got = dict(re.findall(r"rank(\d) read (\d+) of", res.stdout))
    total = int(re.search(r"of (\d+)", res.stdout).group(1))
    assert set(got) == {"0", "1"}
    for rank, n in got.items():
        assert int(n) < 0.6 * total, (rank, n, total)
    assert sum(int(n) for n in got.values()) < 1.1 * total


@pytest.mark.parametrize("code, rc, err", [(None, 0, ""), (2, 2, ""), ("error: bad input", 1, "error: bad input\n")])
def test_exit_worker_keeps_output_and_exit_code(code, rc, err):
    """exit_worker skips finalization (os._exit): what the command printed must still arrive, with its exit code."""
    prog = f"import sys; from stages.distributed import exit_worker; print('done', end=''); sys.stderr.write('w;'); exit_worker({code!r})"
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a worker's stdout may be
    res = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=120)
    assert (res.returncode, res.stdout, res.stderr) == (rc, "done", "w;" + err)


def test_batch_split():
    from stages.distributed import check_split, rank_slice, split_sizes
    from upscale.errors import SamoeError

    assert split_sizes(5, 2) == [3, 2] and split_sizes(4, 4) == [1, 1, 1, 1]
    batch = [7, 3, 9, 1, 4]
    assert rank_slice(batch, 0, 2) + rank_slice(batch, 1, 2) == batch
    check_split(8, 3, 2, "data")  # 3, 3, 2
    with pytest.raises(SamoeError, match="batch of 1 images for 2 processes"):
        check_split(9, 4, 2, "data")  # 4, 4, 1
    with pytest.raises(SamoeError):
        check_split(8, 1, 2, "data")


if __name__ == "__main__" and "--moe-worker" in sys.argv:
    _moe_worker()
    exit_worker(0)
if __name__ == "__main__" and "--rows-worker" in sys.argv:
    _rows_worker(sys.argv[sys.argv.index("--rows-worker") + 1])
    exit_worker(0)
