"""Checkpoint and run directories are untrusted input.

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

import numpy as np
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
    return ["train", "--stage", 1, "--lr", 0.01, "--from", grown, "--data", data / "A", "--run-dir", run, "--batch-size", 4,
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


def record(folder: Path, *paths: str) -> None:
    """Record `paths` (relative to `folder`) in folder's manifest as samoe would have: these tests damage what
    samoe reads from its own files, past the ownership check that refuses anything unrecorded."""
    from upscale.dirfd import Dir
    from upscale.ownership import Owned, read_manifest

    with Dir.open(folder, "test") as d:
        owned = Owned(d, read_manifest(d))
        for rel in paths:
            owned.record(rel, kind="dir" if (folder / rel).is_dir() else "file", save=False)
        owned.save()


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
    record(step1(stopped), "dcp", "dcp/.metadata")
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
    record(step, "dcp", *[f"dcp/{p.name}" for p in (step / "dcp").iterdir()])


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


# --------------------------------------------------------------------------- case 2: checkpoint files


from upscale.checkpoint import INDEX_FILE, META_FILE, SINGLE_FILE  # noqa: E402


def split_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header: dict, ndim: int = 1) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == ndim)


def _float_shape(h: dict) -> None:
    e = h[first_tensor(h)]
    e["shape"] = [float(e["shape"][0])]


def _bool_shape(h: dict) -> None:
    h[first_tensor(h)]["shape"] = [True] * 0 + [True]


def _overlap(h: dict) -> None:
    # two tensors share their bytes: every size still matches, the union no longer tiles the data
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]


def _meta_not_str(h: dict) -> None:
    h["__metadata__"] = {"format": 1}


def _unknown_dtype(h: dict) -> None:
    h[first_tensor(h)]["dtype"] = "F8_E4M3X"


def _offsets_reversed(h: dict) -> None:
    e = h[first_tensor(h)]
    e["data_offsets"] = e["data_offsets"][::-1]


def _extra_key(h: dict) -> None:
    h[first_tensor(h)]["cuda"] = True


HEADER_CASES = {"float-shape": _float_shape, "bool-shape": _bool_shape, "overlap": _overlap,
                "metadata-not-str": _meta_not_str, "unknown-dtype": _unknown_dtype, "offsets-reversed": _offsets_reversed,
                "extra-key": _extra_key}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_shard_header_is_exit_2(base, tmp_path, case):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    header, data = split_shard(ckpt / SINGLE_FILE)
    HEADER_CASES[case](header)
    write_shard(ckpt / SINGLE_FILE, header, data)
    one_error_line(samoe("inspect-checkpoint", ckpt), SINGLE_FILE)


def test_header_length_beyond_the_file_is_exit_2(base, tmp_path):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    raw = (ckpt / SINGLE_FILE).read_bytes()
    (ckpt / SINGLE_FILE).write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])
    one_error_line(samoe("inspect-checkpoint", ckpt), "header length")


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


INDEX_CASES = {
    "weight-map-list": lambda d: d.update(weight_map=list(d["weight_map"].items())),
    "weight-map-int-values": lambda d: d.update(weight_map={k: 1 for k in d["weight_map"]}),
    "weight-map-escapes": lambda d: d["weight_map"].update({k: "../" + v for k, v in d["weight_map"].items()}),
    "weight-map-absolute": lambda d: d["weight_map"].update({k: "/etc/passwd" for k in d["weight_map"]}),
    "index-not-a-table": lambda d: (d.clear(), d.update(x=[])),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_malformed_index_is_exit_2(multi, tmp_path, case):
    ckpt = Path(shutil.copytree(multi, tmp_path / "c"))
    _edit(ckpt / INDEX_FILE, INDEX_CASES[case])
    one_error_line(samoe("inspect-checkpoint", ckpt), INDEX_FILE)


def test_non_utf8_index_is_exit_2(multi, tmp_path):
    ckpt = Path(shutil.copytree(multi, tmp_path / "c"))
    (ckpt / INDEX_FILE).write_bytes(b'{"weight_map": {"\xff\xfe": "x"}}')
    one_error_line(samoe("inspect-checkpoint", ckpt), INDEX_FILE, "UTF-8")


def test_shard_linked_outside_the_checkpoint_is_refused(multi, tmp_path):
    ckpt = Path(shutil.copytree(multi, tmp_path / "c"))
    shard = sorted(ckpt.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    one_error_line(samoe("inspect-checkpoint", ckpt), shard.name, "symbolic link", "never follows")


def test_verify_fails_when_a_shard_has_no_digest(base, tmp_path):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    _edit(ckpt / META_FILE, lambda d: d.update(files={}))
    assert samoe("inspect-checkpoint", ckpt).exit_code == 0  # reading needs no digest
    one_error_line(samoe("inspect-checkpoint", ckpt, "--verify"), SINGLE_FILE, "no digest")


# --------------------------------------------------------------------------- case 3: samoe.json and config


CONFIG_CASES = {
    "depth-string": (lambda c: c.update(depth="4"), "depth"),
    "groups-int": (lambda c: c["moe"].update(groups=4), "moe.groups"),
    "negative-mlp-ratio": (lambda c: c.update(mlp_ratio=-4.0), "mlp_ratio"),
    "zero-heads": (lambda c: c.update(num_heads=0), "num_heads"),
    "huge-depth": (lambda c: c.update(depth=10**9), "depth"),
    "huge-experts": (lambda c: c["moe"].update(groups=[10**8]), "moe.groups"),
    "heads-not-dividing": (lambda c: c.update(num_heads=3), "num_heads"),
    "bool-classes": (lambda c: c.update(num_classes=True), "num_classes"),
    "moe-null": (lambda c: c.update(moe=None), "moe"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_field_is_exit_2_naming_it(base, tmp_path, case):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    fn, field = CONFIG_CASES[case]
    _edit(ckpt / META_FILE, lambda d: fn(d["config"]))
    one_error_line(samoe("inspect-checkpoint", ckpt), field)


@pytest.mark.parametrize("value", [None, [], "tiny"])
def test_config_that_is_not_a_table_is_exit_2(base, tmp_path, value):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    _edit(ckpt / META_FILE, lambda d: d.update(config=value))
    one_error_line(samoe("inspect-checkpoint", ckpt), "config")


@pytest.mark.parametrize("field,value", [("lineage", [{"seed": 0}]), ("files", []), ("provenance", {"x": 3}),
                                         ("stages", {}), ("dtype", "float64")])
def test_bad_samoe_json_field_is_exit_2(base, tmp_path, field, value):
    ckpt = Path(shutil.copytree(base, tmp_path / "c"))
    _edit(ckpt / META_FILE, lambda d: d.update({field: value}))
    one_error_line(samoe("inspect-checkpoint", ckpt), field)


def test_pth_with_non_tensor_entries_is_exit_2(tmp_path):
    pth = tmp_path / "sam.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16), "image_encoder.blocks.0.x": [1, 2]}, pth)
    one_error_line(samoe("init", "--from-sam", pth, "--out", tmp_path / "out"), "not a named tensor")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- case 3: damaged run directories


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


RUN_CASES = {
    "run-json-garbage": ("run.json", lambda p: p.write_bytes(b"\x00\xff not json")),
    "run-json-list": ("run.json", lambda p: p.write_text("[]")),
    "run-json-no-identity": ("run.json", lambda p: p.write_text('{"source_digest": "x"}')),
    "trainer-state-truncated": ("checkpoints/step-1/trainer_state.json", _truncate),
    "trainer-state-step-string": ("checkpoints/step-1/trainer_state.json", lambda p: _edit(p, lambda d: d.update(step="1"))),
    "trainer-state-rng": ("checkpoints/step-1/trainer_state.json", lambda p: _edit(p, lambda d: d["rng"].update(torch="!!"))),
    "trainer-state-lr": ("checkpoints/step-1/trainer_state.json",
                         lambda p: _edit(p, lambda d: d["optimizers"]["optimizer1"][0].update(lr="fast"))),
    "optimizer-truncated": ("checkpoints/step-1/optimizer.safetensors", _truncate),
    "optimizer-garbage": ("checkpoints/step-1/optimizer.safetensors", lambda p: p.write_bytes(b"\x08" + b"\x00" * 7 + b"{}{}{}{}")),
    "latest-escapes": ("checkpoints/latest", lambda p: p.write_text("../../../etc\n")),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_damaged_run_directory_is_exit_2_naming_the_file(grown, data, stopped, case):
    rel, damage = RUN_CASES[case]
    damage(stopped / rel)
    line = one_error_line(samoe(*train_args(grown, data, stopped)))
    assert Path(rel).name in line and ("--force" in line or "--run-dir" in line), line


# --------------------------------------------------------------------------- case 4: images declare their size


def _tiff_bomb(path: Path, side: int = 1 << 16) -> None:
    """A TIFF whose header declares side x side pixels while the file holds almost no data."""
    import tifffile

    tifffile.imwrite(path, shape=(side, side), dtype="uint8", photometric="minisblack")
    with open(path, "r+b") as f:  # keep the header, drop the (sparse) pixel data
        f.truncate(4096)


def test_tiff_declaring_huge_size_is_refused_from_its_header(tmp_path):
    import time

    from stages.data import DataError, read_image

    bomb = tmp_path / "bomb.tif"
    _tiff_bomb(bomb)
    t = time.perf_counter()
    with pytest.raises(DataError, match="bomb.tif: decoding it whole needs 4.0 GiB, more than the image memory budget"):
        read_image(bomb)
    assert time.perf_counter() - t < 5


def test_oversized_image_in_data_is_exit_2_naming_it(grown, data, tmp_path, monkeypatch):
    """A PNG is decoded whole: one larger than the image memory budget is refused from its header, naming it."""
    from PIL import Image

    folder = Path(shutil.copytree(data / "A", tmp_path / "A"))
    Image.fromarray(np.ones((1024, 2048), np.uint16)).save(folder / "images" / "big.png")  # 4 MiB decoded
    Image.fromarray(np.zeros((1024, 2048), np.uint8)).save(folder / "masks" / "big.png")
    monkeypatch.setenv("SAMOE_IMAGE_MEMORY", "3M")
    res = samoe("train", "--stage", 1, "--lr", 0.01, "--from", grown, "--data", folder, "--run-dir", tmp_path / "run",
                "--batch-size", 4, "--max-steps", 1)
    one_error_line(res, "big.png", "image memory budget", "--image-memory")


@pytest.mark.parametrize("damage", ["garbage", "no-step-column", "link"])
def test_damaged_or_linked_metrics_csv_is_exit_2_and_nothing_outside_is_written(grown, data, stopped, tmp_path, damage):
    metrics = stopped / "metrics.csv"
    outside = tmp_path / "precious.txt"
    outside.write_text("step,loss\n1,keep me\n")
    if damage == "garbage":
        metrics.write_bytes(b"step,loss\n\xff\xfe,1\n")
    elif damage == "no-step-column":
        metrics.write_text("loss\n1.0\n")
    else:
        metrics.unlink()
        metrics.symlink_to(outside)
    one_error_line(samoe(*train_args(grown, data, stopped)), "metrics.csv")
    assert outside.read_text() == "step,loss\n1,keep me\n"
