"""Bad input through the real `samoe` console script: one `error:` line on stderr, exit 2,
no traceback, nothing written.

Every case runs `samoe` in its own subprocess, so stderr is exactly what a user sees
(warnings included). The subprocesses (~3 s each, mostly importing torch) run
concurrently from one module fixture; each test then checks its own case.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from upscale import PRESETS, load_model, save_model
from upscale.checkpoint import INDEX_FILE, META_FILE, SINGLE_FILE, Checkpoint
from upscale.create import init_from_preset

SAMOE = Path(sys.executable).parent / "samoe"
pytestmark = pytest.mark.slow  # every case is a real samoe process (22, a third of them importing torch)


def _tree_hashes(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    base = init_from_preset(PRESETS["tiny"], root / "base", 0, torch.float32, ["test"], False)
    multi = save_model(load_model(base), root / "multi", dict(Checkpoint.open(base).meta), shard_bytes=200_000)
    shards = sorted(p.name for p in multi.glob("model-*.safetensors"))
    assert len(shards) >= 3
    outs = root / "outs"
    outs.mkdir()

    def copy(src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, root / name))

    # --- corrupted checkpoints
    truncated = copy(base, "truncated")
    f = truncated / SINGLE_FILE
    f.write_bytes(f.read_bytes()[:-100])

    bitflip = copy(base, "bitflip")
    f = bitflip / SINGLE_FILE
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))

    missing_shard = copy(multi, "missing_shard")
    (missing_shard / shards[1]).unlink()

    index_missing_file = copy(multi, "index_missing_file")
    _edit_json(index_missing_file / INDEX_FILE, lambda d: d.update(
        weight_map={k: v for k, v in d["weight_map"].items() if v != shards[1]}))

    index_missing_tensor = copy(multi, "index_missing_tensor")
    _edit_json(index_missing_tensor / INDEX_FILE, lambda d: d["weight_map"].pop(sorted(d["weight_map"])[0]))

    classes = copy(base, "config_classes")
    _edit_json(classes / META_FILE, lambda d: d["config"].update(num_classes=3))
    depth = copy(base, "config_depth")
    _edit_json(depth / META_FILE, lambda d: d["config"].update(depth=5))
    bad_json = copy(base, "bad_json")
    (bad_json / META_FILE).write_text('{"format": "samoe-checkpoint", ')

    # --- bad SAM inputs
    not_sam = root / "not_sam.pth"
    torch.save({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, not_sam)
    garbage = root / "garbage.pth"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    partial_sam = root / "partial_sam.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.randn(768, 3, 16, 16),
                **{f"image_encoder.blocks.{i}.norm1.weight": torch.ones(768) for i in range(12)}}, partial_sam)

    exists = copy(base, "exists")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")

    inspect = lambda p: ["inspect-checkpoint", str(p), "--verify"]  # noqa: E731
    init = lambda name, *a: ["init", *a, "--out", str(outs / name)]  # noqa: E731
    cases = {
        # (argv, directory that must be left untouched, output that must not appear)
        "verify-truncated-shard": (inspect(truncated), truncated, None),
        "verify-bitflip": (inspect(bitflip), bitflip, None),
        "verify-bitflip-json": (inspect(bitflip) + ["--json"], bitflip, None),
        "verify-missing-shard-file": (inspect(missing_shard), missing_shard, None),
        "verify-index-missing-file": (inspect(index_missing_file), index_missing_file, None),
        "index-missing-tensor": (inspect(index_missing_tensor), index_missing_tensor, None),
        "verify-config-num-classes": (inspect(classes), classes, None),
        "verify-config-depth": (inspect(depth), depth, None),
        "verify-bad-json": (inspect(bad_json), bad_json, None),
        "inspect-nonexistent": (inspect(root / "nope"), None, None),
        "inspect-a-file": (inspect(base / META_FILE), base, None),
        "init-not-sam": (init("not_sam", "--from-sam", str(not_sam)), None, outs / "not_sam"),
        "init-garbage-pth": (init("garbage", "--from-sam", str(garbage)), None, outs / "garbage"),
        "init-nonexistent-pth": (init("nope", "--from-sam", str(root / "nope.pth")), None, outs / "nope"),
        "init-partial-sam": (init("partial", "--from-sam", str(partial_sam), "--experts", "1", "--top-k", "1", "--moe-blocks", "11",
                                  "--no-decoder-moe"), None, outs / "partial"),
        "init-bad-moe-blocks": (init("bad_blocks", "--from-sam", str(not_sam), "--moe-blocks", "a,b"), None, outs / "bad_blocks"),
        "init-out-exists": (["init", "--preset", "tiny", "--out", str(exists)], exists, None),
        "init-out-foreign-force": (["init", "--preset", "tiny", "--out", str(foreign), "--force"], foreign, None),
        "init-both": (init("both", "--preset", "tiny", "--from-sam", str(not_sam)), None, outs / "both"),
        "init-neither": (init("neither"), None, outs / "neither"),
        "init-unknown-preset": (init("unknown", "--preset", "huge"), None, outs / "unknown"),
        "init-bad-dtype": (init("dtype", "--preset", "tiny", "--dtype", "float64"), None, outs / "dtype"),
    }
    before = {name: _tree_hashes(c[1]) for name, c in cases.items() if c[1] is not None}

    def run(argv):
        return subprocess.run([str(SAMOE), *argv], cwd=root, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "COLUMNS": "200"})

    with ThreadPoolExecutor(max_workers=max(2, min(6, os.cpu_count() or 2))) as pool:
        procs = dict(zip(cases, pool.map(run, [c[0] for c in cases.values()])))
    out = {}
    for name, (argv, keep, target) in cases.items():
        out[name] = {"proc": procs[name], "keep": keep, "before": before.get(name), "target": target, "outs": outs,
                     "root": root}
    return out


CASE_IDS = [
    "verify-truncated-shard", "verify-bitflip", "verify-bitflip-json", "verify-missing-shard-file", "verify-index-missing-file",
    "index-missing-tensor", "verify-config-num-classes", "verify-config-depth", "verify-bad-json",
    "inspect-nonexistent", "inspect-a-file", "init-not-sam", "init-garbage-pth",
    "init-nonexistent-pth", "init-partial-sam", "init-bad-moe-blocks", "init-out-exists", "init-out-foreign-force",
    "init-both", "init-neither", "init-unknown-preset", "init-bad-dtype",
]


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_is_one_error_line(results, case):
    r = results[case]
    p = r["proc"]
    report = f"rc={p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stdout + p.stderr, report
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    assert p.returncode == 2, report
    if r["keep"] is not None:
        assert _tree_hashes(r["keep"]) == r["before"], "input directory was modified"
    if r["target"] is not None:
        assert not r["target"].exists(), "an output was left behind"
    assert sorted(p.name for p in r["outs"].iterdir()) == [] or all(
        not p.name.startswith(".") for p in r["outs"].iterdir()), "temporary directory left behind"
    assert not [q.name for q in r["root"].iterdir() if ".tmp-" in q.name or ".old-" in q.name]


def test_messages_name_the_problem(results):
    """Spot checks that the one line says what is wrong (not just that something is)."""
    msg = {name: r["proc"].stderr for name, r in results.items()}
    assert "truncated" in msg["verify-truncated-shard"]
    assert "missing" in msg["verify-missing-shard-file"]
    assert "digest" in msg["verify-bitflip"] and msg["verify-bitflip"] == msg["verify-bitflip-json"]
    assert "--force" in msg["init-out-exists"]
    assert "huge" in msg["init-unknown-preset"]
    assert "float64" in msg["init-bad-dtype"]
    assert "not a SAM checkpoint" in msg["init-not-sam"]
    assert "lacks" in msg["init-partial-sam"] or "incomplete" in msg["init-partial-sam"]
    assert "does not exist" in msg["init-nonexistent-pth"] and "does not exist" in msg["inspect-nonexistent"]
