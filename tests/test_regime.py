"""`samoe eval`'s line on the regime a grown model's source was in (stages/regime.py)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from stages import regime
from stages.regime import loss_tail, source_regime, training_log
from upscale.checkpoint import Checkpoint, load_model, save_model
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups


def _log(path: Path, losses: list[float], seg: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "loss_sup", "seg"])
        for i, loss in enumerate(losses, 1):
            w.writerow([i, 0, loss, loss, seg])


def test_loss_tail_by_hand(tmp_path: Path) -> None:
    # 2000 steps falling linearly from 3.0 to 1.0: over the last 1000 steps (1001..2000) the first fifth averages
    # the loss at steps 1001..1200 and the last fifth at 1801..2000
    losses = [3.0 - 2.0 * (i - 1) / 1999 for i in range(1, 2001)]
    _log(tmp_path / "m.csv", losses, 0.5)
    drop, seg = loss_tail(tmp_path / "m.csv")
    first = sum(losses[1000:1200]) / 200
    last = sum(losses[1800:2000]) / 200
    assert drop == pytest.approx((first - last) / first * 1000 / 999)
    assert seg == 0.5
    _log(tmp_path / "flat.csv", [2.0] * 50, 0.4)
    assert loss_tail(tmp_path / "flat.csv") == (0.0, 0.4)
    _log(tmp_path / "short.csv", [2.0] * 3, 0.4)
    assert loss_tail(tmp_path / "short.csv") is None


def test_training_log_is_the_runs_regular_metrics_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    assert training_log(run / "final") is None
    _log(run / "metrics.csv", [1.0] * 20, 0.1)
    assert training_log(run / "final") == run / "metrics.csv"
    assert training_log(run) is None  # only a run's final/ has a training log beside it
    other = tmp_path / "other"
    (other / "final").mkdir(parents=True)
    (other / "metrics.csv").symlink_to(run / "metrics.csv")
    assert training_log(other / "final") is None  # a link is not followed


@pytest.fixture(scope="module")
def source_run(src: Path, tmp_path_factory) -> Path:
    """A 'trained' source: the fresh tiny checkpoint saved as RUN/final, with a training log beside it."""
    run = tmp_path_factory.mktemp("regime") / "run"
    save_model(load_model(src), run / "final", dict(Checkpoint.open(src).meta))
    return run


def _grow(source_run: Path, out: Path) -> Checkpoint:
    spec = GrowthSpec(experts=8, groups=resolve_groups(4, 8, "2", 1))
    return Checkpoint.open(expand_checkpoint(source_run / "final", out, spec, ["test"]))


def test_each_verdict(source_run: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grown = _grow(source_run, tmp_path / "g")
    assert grown.meta["growth"]["source"] == str((source_run / "final").resolve())
    log = source_run / "metrics.csv"
    held_seg, interior = regime.heldout(source_run / "final", data / "A-test")
    assert 0 < held_seg < math.inf and 0 <= interior < 0.95  # an untrained model

    _log(log, [3.0 - i / 1000 for i in range(1500)], held_seg)  # falling 1/3 % per step at the end
    r = source_regime(grown, data / "A-test")
    assert r.verdict == "still learning" and "further" in r.line and r.heldout_seg_loss is None

    _log(log, [2.0] * 1500, held_seg / 2)  # flat, but its training loss is half its held-out loss
    r = source_regime(grown, data / "A-test")
    assert r.verdict == "data-bound" and r.heldout_seg_loss == pytest.approx(held_seg)

    _log(log, [2.0] * 1500, held_seg)  # flat, the same loss on new data, classes confused inside regions
    r = source_regime(grown, data / "A-test")
    assert r.verdict == "capacity-bound" and "growth can pay" in r.line
    assert r.interior_miou == pytest.approx(interior)

    monkeypatch.setattr(regime, "BORDER_INTERIOR_MIOU", interior)  # as if its interiors were already right
    assert source_regime(grown, data / "A-test").verdict == "border-bound"

    log.unlink()
    r = source_regime(grown, data / "A-test")
    assert r.verdict == "unknown" and "metrics.csv" in r.line
