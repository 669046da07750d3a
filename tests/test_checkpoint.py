"""Oracle tests for upscale/checkpoint.py: bit-exact round trips, sharding, index, atomic writes.

Oracles: the in-memory model itself (torch.equal on every tensor), safetensors headers
parsed here with struct + json (not via the library), and hashlib over the files.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from typer.testing import CliRunner

import cli
import upscale.checkpoint as ckpt_mod
from upscale import PRESETS, build_model, load_model, save_model
from upscale.checkpoint import INDEX_FILE, META_FILE, SINGLE_FILE, Checkpoint
from upscale.create import init_from_preset
from upscale.ownership import OWNER_FILE

TINY = PRESETS["tiny"]
SHARD = 200_000
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --------------------------------------------------------------------------- helpers


def read_header(path: Path) -> dict:
    """The safetensors header of `path` (tensor entries only), checked against the file size."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    assert 8 + n + end == len(raw), f"{path.name}: header does not describe the file"
    return header


def numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def all_headers(path: Path) -> dict[str, dict]:
    return {f.name: read_header(f) for f in shard_files(path)}


def assert_same_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected) or set(state) == set(expected)
    for name, t in expected.items():
        got = state[name]
        assert got.dtype == t.dtype, name
        assert torch.equal(got, t), name


def leftovers(out: Path) -> list[str]:
    """Temporary siblings a write may leave (`.NAME.tmp-PID`, `.NAME.old-PID`)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def file_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def init_tiny(out: Path, seed: int = 0, dtype=torch.float32, force: bool = False) -> Path:
    return init_from_preset(TINY, out, seed, dtype, ["samoe", "init", "--preset", "tiny"], force)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A single-shard tiny checkpoint, a multi-shard copy of it, and the in-memory reference state."""
    root = tmp_path_factory.mktemp("ckpt")
    single = init_tiny(root / "single")
    reference = {k: v.clone() for k, v in build_model(TINY, seed=0).state_dict().items()}
    multi = save_model(load_model(single), root / "multi", dict(Checkpoint.open(single).meta), shard_bytes=SHARD)
    return {"single": single, "multi": multi, "reference": reference}


# --------------------------------------------------------------------------- round trips


def test_init_then_load_is_bit_exact(tiny):
    path = tiny["single"]
    assert sorted(p.name for p in path.iterdir()) == sorted([SINGLE_FILE, META_FILE, OWNER_FILE])
    assert_same_state(load_model(path), tiny["reference"])
    header = read_header(path / SINGLE_FILE)
    assert set(header) == set(tiny["reference"])
    for name, t in tiny["reference"].items():
        assert header[name]["shape"] == list(t.shape), name


def test_multi_shard_save_and_reload_is_bit_exact(tiny):
    path = tiny["multi"]
    shards = shard_files(path)
    n = len(shards)
    assert n > 1, "tiny shard size should force several shards"
    assert [p.name for p in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not (path / SINGLE_FILE).exists() and (path / INDEX_FILE).exists()
    assert_same_state(load_model(path), tiny["reference"])
    # shards respect the size bound (a shard may exceed it only when it holds one tensor)
    for f, header in all_headers(path).items():
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        assert data <= SHARD or len(header) == 1, f


def test_resave_multi_to_single_is_bit_exact(tiny, tmp_path):
    """multi -> single shard again: identical bytes to the original single-shard file's tensors."""
    out = save_model(load_model(tiny["multi"]), tmp_path / "again", dict(Checkpoint.open(tiny["multi"]).meta))
    assert not (out / INDEX_FILE).exists()
    assert_same_state(load_model(out), tiny["reference"])
    # the header + data section is canonical: same tensors give the same file
    assert (out / SINGLE_FILE).read_bytes() == (tiny["single"] / SINGLE_FILE).read_bytes()


def test_bfloat16_checkpoint_is_the_cast_model(tmp_path):
    path = init_tiny(tmp_path / "bf16", dtype=torch.bfloat16)
    meta = json.loads((path / META_FILE).read_text())
    assert meta["dtype"] == "bfloat16"
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in build_model(TINY, seed=0).state_dict().items()}
    assert_same_state(load_model(path), expected)
    assert {e["dtype"] for e in read_header(path / SINGLE_FILE).values()} == {"BF16"}
    # load with an explicit dtype upcasts exactly
    up = load_model(path, dtype=torch.float32)
    for name, t in expected.items():
        assert torch.equal(up.state_dict()[name], t.float()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_tensors_equals_torch_isfinite(tmp_path, dtype):
    """--verify's raw-bit check (numpy, no torch) against torch.isfinite on every tensor, in chunks of 1000 bytes
    (whole values per chunk; the larger tensors span many chunks)."""
    path = init_from_preset(PRESETS["tiny"], tmp_path / "ck", 0, dtype, ["test"], False)
    ck = Checkpoint.open(path)
    names = sorted(n for n, i in ck.tensors.items() if i.nbytes >= 16)
    info = torch.finfo(dtype)
    plants = {names[0]: float("nan"), names[3]: float("inf"), names[7]: float("-inf"), names[11]: info.max,
              names[13]: info.smallest_normal / 4, names[-1]: float("nan")}  # max and a subnormal are finite
    for name, value in plants.items():
        t = ck.tensors[name]
        f = path / t.file
        raw = bytearray(f.read_bytes())
        at = t.offset + (t.nbytes // 2 // dtype.itemsize) * dtype.itemsize
        raw[at : at + dtype.itemsize] = torch.tensor([value], dtype=dtype).view(torch.uint8).numpy().tobytes()
        f.write_bytes(bytes(raw))
    ck = Checkpoint.open(path)
    oracle = sorted(n for n, t in ck.iter_tensors() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    assert oracle == sorted({names[0], names[3], names[7], names[-1]})
    assert sorted(ck.nonfinite_tensors(chunk_bytes=1000)) == oracle
    assert sorted(ck.nonfinite_tensors()) == oracle


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny):
    again = init_tiny(tmp_path / "again", seed=0)
    other = init_tiny(tmp_path / "other", seed=1)
    a = hashlib.sha256((tiny["single"] / SINGLE_FILE).read_bytes()).hexdigest()
    assert hashlib.sha256((again / SINGLE_FILE).read_bytes()).hexdigest() == a
    assert hashlib.sha256((other / SINGLE_FILE).read_bytes()).hexdigest() != a
    assert Checkpoint.open(again).digest == Checkpoint.open(tiny["single"]).digest


# --------------------------------------------------------------------------- metadata, index, inspect


@pytest.mark.parametrize("which", ["single", "multi"])
def test_samoe_json_files_match_disk(tiny, which):
    path = tiny[which]
    meta = json.loads((path / META_FILE).read_text())
    assert meta["format"] == "samoe-checkpoint"
    assert set(meta["files"]) == {p.name for p in shard_files(path)}
    for name, info in meta["files"].items():
        raw = (path / name).read_bytes()
        assert info["bytes"] == len(raw)
        assert set(info) == {"blake3", "bytes"} and info["blake3"] == blake3(raw).hexdigest()
    assert set(meta["provenance"]) == set(tiny["reference"])
    assert Checkpoint.open(path).verify_digests() == []


def test_index_weight_map_covers_all_tensors(tiny):
    path = tiny["multi"]
    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    headers = all_headers(path)
    located = {name: f for f, h in headers.items() for name in h}
    assert len(located) == sum(len(h) for h in headers.values()), "a tensor is stored twice"
    assert weight_map == located
    assert set(weight_map) == set(tiny["reference"])
    assert index["metadata"]["total_size"] == sum(
        e["data_offsets"][1] - e["data_offsets"][0] for h in headers.values() for e in h.values())
    assert set(weight_map.values()) == set(json.loads((path / META_FILE).read_text())["files"])


@pytest.mark.parametrize("which", ["single", "multi"])
def test_inspect_checkpoint_json_totals_match_headers(tiny, which):
    path = tiny[which]
    result = CliRunner().invoke(cli.app, ["inspect-checkpoint", str(path), "--json", "--verify"])
    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    headers = all_headers(path)
    entries = [e for h in headers.values() for e in h.values()]
    total = sum(numel(e["shape"]) for e in entries)
    assert report["total_params"] == total == sum(t.numel() for t in tiny["reference"].values())
    assert report["weight_bytes"] == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)
    assert report["weight_bytes"] == sum(numel(e["shape"]) * ITEMSIZE[e["dtype"]] for e in entries)
    assert sum(report["params_by_component"].values()) == total
    assert sum(report["params_by_provenance"].values()) == total
    assert report["params_by_provenance"] == {"random": total}
    dtypes: dict[str, int] = {}
    for e in entries:
        dtypes[e["dtype"]] = dtypes.get(e["dtype"], 0) + 1
    assert report["tensor_dtypes"] == dtypes
    assert [s["file"] for s in report["shards"]] == sorted(headers)
    for s in report["shards"]:
        raw = (path / s["file"]).read_bytes()
        assert s["bytes"] == len(raw) and s["blake3"] == blake3(raw).hexdigest()
    assert report["verify"]["ok"] is True
    # MoE layout: tiny has MoE in encoder blocks 2, 3 and both decoder layers
    assert sorted(report["experts_per_layer"]) == sorted(
        [f"image_encoder.blocks.{i}.mlp" for i in TINY.moe_blocks]
        + [f"mask_decoder.transformer.layers.{i}.mlp" for i in range(TINY.decoder_depth)])
    moe_expert_params = sum(numel(e["shape"]) for h in headers.values() for n, e in h.items() if ".mlp.experts." in n)
    assert report["params_by_component"]["moe_experts"] == moe_expert_params


# --------------------------------------------------------------------------- atomicity


class _Poisoned(torch.Tensor):
    """A tensor whose shape/dtype can be read but whose data cannot: the write fails on it."""

    exc: BaseException = RuntimeError("disk full")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__get__", "is_floating_point", "size", "dim", "numel", "element_size"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise cls.exc


class _StateOnly(torch.nn.Module):
    """save_model only needs state_dict()."""

    def __init__(self, state):
        super().__init__()
        self._state = state

    def state_dict(self, *a, **kw):
        return self._state


def _poisoned_model(tiny, exc: BaseException):
    """The tiny model with a tensor ~3/4 of the way through poisoned (earlier shards get written first)."""
    state = dict(load_model(tiny["single"]).state_dict())
    name = list(state)[3 * len(state) // 4]
    poisoned = type("P", (_Poisoned,), {"exc": exc})
    state[name] = state[name].detach().as_subclass(poisoned)
    return _StateOnly(state)


def _fail_final_rename(monkeypatch, out: Path):
    """os.replace(<temporary dir>, out) fails: the commit's rename of the new checkpoint into place."""
    real = ckpt_mod.os.replace
    calls = []

    def replace(src, dst, *a, **kw):  # names relative to the parent's descriptor (upscale.dirfd)
        if Path(dst).name == out.name and ".tmp-" in Path(src).name:
            calls.append(src)
            raise OSError(16, "Device or resource busy")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    return calls


FAILURES = ["tensor-write", "interrupt", "final-rename"]


def _inject(kind, tiny, monkeypatch, out):
    if kind == "tensor-write":
        return _poisoned_model(tiny, RuntimeError("disk full")), RuntimeError
    if kind == "interrupt":
        return _poisoned_model(tiny, KeyboardInterrupt()), KeyboardInterrupt
    _fail_final_rename(monkeypatch, out)
    return load_model(tiny["single"]), OSError


@pytest.mark.parametrize("kind", FAILURES)
def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch, kind):
    out = tmp_path / "out"
    model, exc = _inject(kind, tiny, monkeypatch, out)
    meta = dict(Checkpoint.open(tiny["single"]).meta)
    with pytest.raises(exc):
        save_model(model, out, meta, shard_bytes=SHARD)
    assert not out.exists()
    assert leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", [
    "tensor-write", "interrupt",
    "final-rename",  # regression: the old checkpoint must be moved back if the final rename fails
])
def test_failed_forced_overwrite_keeps_old_checkpoint(tiny, tmp_path, monkeypatch, kind):
    out = init_tiny(tmp_path / "out", seed=1)
    before = file_hashes(out)
    model, exc = _inject(kind, tiny, monkeypatch, out)
    meta = dict(Checkpoint.open(tiny["single"]).meta)
    with pytest.raises(exc):
        save_model(model, out, meta, shard_bytes=SHARD, force=True)
    assert leftovers(out) == []
    assert out.exists() and file_hashes(out) == before


def test_forced_overwrite_replaces_cleanly(tiny, tmp_path):
    out = init_tiny(tmp_path / "out", seed=1)
    save_model(load_model(tiny["single"]), out, dict(Checkpoint.open(tiny["single"]).meta), shard_bytes=SHARD, force=True)
    assert leftovers(out) == []
    assert not (out / SINGLE_FILE).exists(), "stale single shard left beside the new shards"
    assert_same_state(load_model(out), tiny["reference"])


def test_cli_init_failing_mid_write_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "ck"
    (tmp_path / "sub").mkdir()
    calls = _fail_final_rename(monkeypatch, out)
    result = CliRunner().invoke(cli.app, ["init", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code in (1, 2)  # an OSError may be reported as the user's environment (2)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert calls, "the failure was not injected"
    assert not out.exists() and leftovers(out) == []
