"""Property-based fuzzing of what samoe reads from checkpoint directories.

Hypothesis mutates a real tiny checkpoint: its safetensors shard header (near-valid
perturbations of shapes, offsets and dtypes, foreign JSON values, raw bytes, a wrong
length prefix, truncation), its index file (`weight_map`) and its `samoe.json`
(config fields, digests, lineage). Then `samoe inspect-checkpoint` (and `--verify`)
runs on it through the CLI. A fourth property damages a run's `trainer_state.json`
(any field, a few levels deep) and resumes from it in-process: it must be refused
with a one-line `SamoeError`, or else everything the engine reads next has its type.
Oracles, for every generated checkpoint case:

* the exit code is 0 or 2, never 1 (an internal error) and never an escaped exception;
* exit 2 prints exactly one `error:` line on stderr and no traceback;
* `--verify` exits 2 whenever a shard's bytes changed (the digests are recorded);
  an index whose weight_map differs from the true one is always exit 2;
* nothing is left behind in the directory, each case takes bounded time and
  the process's peak memory never grows by more than 512 MiB.

Examples per test: SAMOE_FUZZ_EXAMPLES (default 80, four tests: 320 cases), with a
fixed derandomized seed so the suite is reproducible.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
from upscale import load_model
from upscale.checkpoint import INDEX_FILE, META_FILE, SINGLE_FILE, Checkpoint
from upscale.config import PRESETS
from upscale.create import init_from_preset
from upscale.errors import SamoeError

EXAMPLES = int(os.environ.get("SAMOE_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SECONDS = 10.0  # per CLI call: headers of a tiny checkpoint take milliseconds

pytestmark = pytest.mark.usefixtures("one_thread")


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MEMORY = 512 * 1024**2  # no generated case may raise the peak by more (a tiny checkpoint is ~1 MB)
_PEAK = {"before": 0}


@pytest.fixture(scope="module", autouse=True)
def peak_before():
    """The peak before this module's cases (earlier test modules may have raised it; it never falls)."""
    _PEAK["before"] = peak_rss()


def run_cli(*args) -> tuple[int, str]:
    t = time.perf_counter()
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert time.perf_counter() - t < SECONDS, f"{args} took {time.perf_counter() - t:.1f}s"
    grown = peak_rss() - _PEAK["before"]
    assert grown < MEMORY, f"{args} raised peak memory by {grown >> 20} MiB"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in (0, 2), (res.exit_code, res.stderr[-800:])
    assert "Traceback" not in res.stderr + res.stdout
    if res.exit_code == 2:
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return res.exit_code, res.stderr


class Copy:
    """A fresh copy of a checkpoint for one example; checks nothing was added and removes it."""

    def __init__(self, src: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="samoe-fuzz-"))
        self.path = Path(shutil.copytree(src, self.root / "c"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                assert sorted(p.name for p in self.root.iterdir()) == ["c"], "something was left beside the checkpoint"
                assert not [p for p in self.path.iterdir() if p.name.startswith(".") and p.name != ".samoe-owner.json"], \
                    "a temporary was left behind"
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
near_ints = st.one_of(st.integers(-3, 3), st.integers(0, 2**64), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1]))


def split_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@st.composite
def shard_mutations(draw):
    """A function (header dict, data bytes) -> file bytes that damages the shard in one of many ways."""
    kind = draw(st.sampled_from(["shape", "offsets", "dtype", "field", "drop", "extra", "metadata", "whole", "raw",
                                 "length", "truncate", "append"]))
    index = draw(st.integers(0, 10**6))
    value = draw(json_values)
    delta = draw(near_ints)
    pos = draw(st.integers(0, 3))
    blob = draw(st.binary(max_size=48))

    def apply(header: dict, data: bytes) -> bytes:
        names = [k for k in header if k != "__metadata__"]
        name = names[index % len(names)]
        entry = header[name]
        prefix = None
        if kind == "shape":
            shape = list(entry["shape"]) or [1]
            shape[pos % len(shape)] = draw_shape_value(shape[pos % len(shape)], delta, value)
            entry["shape"] = shape
        elif kind == "offsets":
            lo, hi = entry["data_offsets"]
            entry["data_offsets"] = [[lo + delta, hi], [lo, hi + delta], [lo + delta, hi + delta], [hi, lo]][pos]
        elif kind == "dtype":
            entry["dtype"] = ["F64", "I8", "BOOL", "f32", "F8_E5M2", value][pos % 6] if pos else value
        elif kind == "field":
            entry[["dtype", "shape", "data_offsets", "dtype"][pos]] = value
        elif kind == "drop":
            del entry[["dtype", "shape", "data_offsets", "dtype"][pos]]
        elif kind == "extra":
            entry["x"] = value
        elif kind == "metadata":
            header["__metadata__"] = value if pos else {"format": value}
        elif kind == "whole":
            header = value if not isinstance(value, dict) or pos else {name: value}
        text = json.dumps(header).encode()
        if kind == "raw":
            text = blob
        body = text + data
        prefix = struct.pack("<Q", len(text))
        if kind == "length":
            prefix = struct.pack("<Q", (len(text) + delta) % 2**64)
        out = prefix + body
        if kind == "truncate":
            out = out[: max(0, len(out) - 1 - delta % 4096)]
        if kind == "append":
            out = out + (blob or b"\0")
        return out

    return apply


def draw_shape_value(old: int, delta: int, value):
    # near-valid first (off by a little, a float, a bool, negative), then anything
    return [old + 1, float(old), True, -old - 1, old * 2**40, value, old + delta][abs(delta) % 7]


# --------------------------------------------------------------------------- the properties


@FUZZ
@given(mutate=shard_mutations())
def test_fuzz_shard_header(base, mutate):
    with Copy(base) as ckpt:
        header, data = split_shard(ckpt / SINGLE_FILE)
        original = (ckpt / SINGLE_FILE).read_bytes()
        damaged = mutate(header, data)
        (ckpt / SINGLE_FILE).write_bytes(damaged)
        if run_cli("inspect-checkpoint", ckpt)[0] == 0:
            # an accepted header must describe tensors that can really be read, each inside the file
            try:
                for name, tensor in Checkpoint.open(ckpt).iter_tensors():
                    assert tensor.numel() * tensor.element_size() <= len(damaged), name
            except SamoeError:
                pass
        code, err = run_cli("inspect-checkpoint", ckpt, "--verify")
        if damaged != original:
            assert code == 2, "a changed shard passed --verify"


@st.composite
def index_documents(draw, names: list[str], shards: list[str]):
    """A damaged index: weight_map values from near-miss file names, wrong types, or a foreign document."""
    kind = draw(st.sampled_from(["values", "types", "drop", "add", "whole", "bytes", "list"]))
    picks = st.sampled_from(shards + ["../" + shards[0], "/" + shards[0], shards[0] + "/", ".", "..", "",
                                      "model.safetensors", "samoe.json", "x\u0000y", shards[0].upper()])
    changes = draw(st.dictionaries(st.sampled_from(names), picks, min_size=1, max_size=4))
    value = draw(json_values)
    blob = draw(st.binary(max_size=64))
    return kind, changes, value, blob


@FUZZ
@given(data=st.data())
def test_fuzz_index(multi, data):
    truth = json.loads((multi / INDEX_FILE).read_text())
    names = sorted(truth["weight_map"])
    shards = sorted(set(truth["weight_map"].values()))
    kind, changes, value, blob = data.draw(index_documents(names, shards))
    with Copy(multi) as ckpt:
        doc = json.loads(json.dumps(truth))
        wm = doc["weight_map"]
        if kind == "values":
            wm.update(changes)
        elif kind == "types":
            wm[next(iter(changes))] = value
        elif kind == "drop":
            for k in changes:
                wm.pop(k)
        elif kind == "add":
            wm.update({f"extra.{k}": v for k, v in changes.items()})
        elif kind == "whole":
            doc = value
        elif kind == "list":
            doc["weight_map"] = [[k, v] for k, v in wm.items()]
        raw = blob if kind == "bytes" else json.dumps(doc).encode()
        (ckpt / INDEX_FILE).write_bytes(raw)
        code, err = run_cli("inspect-checkpoint", ckpt)
        same = isinstance(doc, dict) and doc.get("weight_map") == truth["weight_map"] and kind != "bytes"
        if not same:
            assert code == 2, f"a wrong weight_map was accepted ({kind})"


CONFIG_FIELDS = ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "window_size",
                 "global_attn_indexes", "out_chans", "decoder_depth", "decoder_mlp_dim", "decoder_num_heads",
                 "num_classes", "moe_blocks", "decoder_moe", "extra_blocks", "extra_blocks_moe", "moe",
                 "moe.groups", "moe.core_groups", "moe.top_k", "moe.top_k_groups", "moe.aux_loss_coef", "moe.routed_top_k"]
# fields that need not change any tensor's shape (routing settings, head counts without per-head tensors, ...)
SHAPE_NEUTRAL = {"aux_loss_coef", "top_k", "top_k_groups", "routed_top_k", "core_groups", "extra_blocks_moe", "decoder_num_heads", "mlp_ratio"}
META_FIELDS = ["config", "files", "lineage", "provenance", "stages", "dtype", "format_version", "format"]


@st.composite
def meta_documents(draw):
    where = draw(st.sampled_from(["config"] * 3 + ["meta"]))
    field = draw(st.sampled_from(CONFIG_FIELDS if where == "config" else META_FIELDS))
    value = draw(st.one_of(json_values, near_ints, st.lists(near_ints, max_size=4),
                           st.floats(-1e6, 1e6, allow_nan=False)))
    return where, field, value


@FUZZ
@given(change=meta_documents())
def test_fuzz_samoe_json(base, change):
    where, field, value = change
    with Copy(base) as ckpt:
        doc = json.loads((ckpt / META_FILE).read_text())
        before = json.loads(json.dumps(doc))
        target = doc["config"] if where == "config" else doc
        if field.startswith("moe."):
            target = target["moe"]
            field = field[4:]
        target[field] = value
        (ckpt / META_FILE).write_text(json.dumps(doc))
        run_cli("inspect-checkpoint", ckpt)
        code, err = run_cli("inspect-checkpoint", ckpt, "--verify")
        if doc != before and where == "config" and field not in SHAPE_NEUTRAL:
            assert code == 2, f"a changed config passed --verify: {field}={value!r}"


# --------------------------------------------------------------------------- trainer_state.json of a run


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A stage-1 step checkpoint of a tiny grown model, and the model and optimizers a resume loads it into."""
    from stages.data import make_demo_data
    from stages.engine import apply_stage
    from stages.optim import build_optimizers
    from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups

    root = tmp_path_factory.mktemp("fzrun")
    make_demo_data(root / "d", labelled=4, unlabelled=0, test=0, size=128, seed=0)
    src = init_from_preset(PRESETS["tiny"], root / "src", 0, torch.float32, ["test"], False)
    grown = expand_checkpoint(src, root / "g", GrowthSpec(experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=0,
                                                          noise_std=0.01), ["test"])
    res = CliRunner().invoke(cli.app, [str(a) for a in ["train", "--stage", 1, "--set", "lr=0.01", "--from", grown, "--data", root / "d" / "A",
                                                         "--run-dir", root / "run", "--set", "batch_size=4", "--set", "max_steps=2",
                                                         "--set", "checkpoint_every=1"]])
    assert res.exit_code == 0, res.stderr
    model = load_model(grown)
    apply_stage(model, Checkpoint.open(grown).provenance, 1, 1)
    return root / "run" / "checkpoints" / "step-1", model, build_optimizers(model, 0.01)


@st.composite
def state_changes(draw, doc: dict):
    """A path into trainer_state.json (top-level key first, then a few random steps down) and what to do there."""
    path: list = [draw(st.sampled_from(sorted(doc)))]
    node = doc[path[0]]
    for _ in range(draw(st.integers(0, 3))):
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            key = draw(st.integers(0, len(node) - 1))
        else:
            break
        path.append(key)
        node = node[key]
    action = draw(st.sampled_from(["set", "set", "delete"]))
    value = draw(st.one_of(json_values, near_ints, st.lists(near_ints, max_size=3)))
    return path, action, value


@FUZZ
@given(data=st.data())
def test_fuzz_trainer_state(resumable, data):
    import random

    import numpy as np

    from stages.checkpointer import Checkpointer

    step, model, opts = resumable
    doc = json.loads((step / "trainer_state.json").read_text())
    path, action, value = data.draw(state_changes(doc))
    with Copy(step) as copy:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if action == "delete":
            del target[path[-1]]
        else:
            target[path[-1]] = value
        (copy / "trainer_state.json").write_text(json.dumps(doc))
        rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            state = Checkpointer(copy.parent / "run").load(copy, model, opts)
        except SamoeError as e:
            assert "\n" not in str(e)
        else:  # accepted: everything the engine reads next has its type
            assert type(state["step"]) is int and state["step"] >= 0
            for key in ("loader", "uloader"):
                assert set(state[key]) == {"epoch", "pos"} and all(type(v) is int for v in state[key].values())
            for opt in opts.named().values():
                for group in opt.param_groups:
                    assert all(type(group[k]) in (int, float) for k in ("lr", "weight_decay")), group
        finally:
            torch.set_rng_state(rng[0])
            np.random.set_state(rng[1])
            random.setstate(rng[2])


# --------------------------------------------------------------------------- generated trees
#
# A real samoe output (a checkpoint, demo data, a run directory, a pseudo-label folder, a plot folder with the
# run it reads) is copied and then damaged: entries replaced by symbolic links out of the tree (to a victim
# folder and file beside it) or into it, by FIFOs, by a folder where a file was (or the reverse), deleted, or
# joined by files and folders samoe never wrote. The command that owns the tree then runs on it in-process
# (--force where it has one, a plain rerun where it resumes). Oracles, for every case: the victims and the
# inputs outside the tree are unchanged; every entry the damage planted is still there, as it was; the exit
# code is 0 or 2 (2: one line); the case ends in bounded CPU time and memory, and never hangs.

TREE_EXAMPLES = int(os.environ.get("SAMOE_FUZZ_TREES", "200"))
TREES = settings(FUZZ, max_examples=TREE_EXAMPLES)
DAMAGE = ["link-out-dir", "link-out-file", "link-in", "fifo", "missing", "extra-file", "extra-dir", "dir-for-file",
          "file-for-dir"]
NAMES = ["notes.txt", ".hidden", "step-9", ".x.tmp-0123456789abcdef", ".samoe-owner.json.tmp-00ff", "latest",
         "model.safetensors"]


def _walk(root: Path) -> list[str]:
    """Relative paths of every entry under `root`, links not followed ("" is the root itself)."""
    out = [""]
    for dirpath, dirnames, filenames in os.walk(root):
        out += [str((Path(dirpath) / n).relative_to(root)) for n in sorted(dirnames + filenames)]
    return out


def _state(root: Path) -> dict[str, tuple]:
    """Kind and content (digest or link target) of every entry under `root`, links not followed."""
    import hashlib
    import stat as st_

    out = {}
    for rel in _walk(root)[1:]:
        p = root / rel
        mode = os.lstat(p).st_mode
        out[rel] = (("link", os.readlink(p)) if st_.S_ISLNK(mode) else
                    ("file", hashlib.sha256(p.read_bytes()).hexdigest()) if st_.S_ISREG(mode) else
                    ("dir",) if st_.S_ISDIR(mode) else ("other",))
    return out


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _inside(tree: Path, p: Path) -> bool:
    """`p` is reached from `tree` through real folders only (damage never goes through a link it made)."""
    return all(os.path.isdir(q) and not os.path.islink(q) for q in [tree, *[a for a in p.parents if a.is_relative_to(tree)]])


def _damage(tree: Path, victim: Path, damage: list[tuple[str, str, str]]) -> dict[str, str]:
    """Apply the damage; return what it planted (relative path -> kind), which samoe must leave alone."""
    planted: dict[str, str] = {}
    for kind, rel, name in damage:
        p = tree / rel if rel else tree
        if not os.path.lexists(p) or (rel and not _inside(tree, p)):
            continue
        is_dir = p.is_dir() and not p.is_symlink()
        if kind.startswith("extra"):
            folder = p if is_dir else p.parent
            if not _inside(tree, folder / name):
                continue
            new = folder / name
            if os.path.lexists(new):
                continue
            if kind == "extra-file":
                new.write_text("a user's file")
            else:
                new.mkdir()
                (new / "inside.txt").write_text("a user's file")
            planted[str(new.relative_to(tree)) if new != tree else ""] = "file" if kind == "extra-file" else "dir"
            continue
        if kind == "file-for-dir" and not is_dir or kind == "dir-for-file" and is_dir:
            continue
        for key in [k for k in planted if k == rel or k.startswith(rel + "/") or not rel]:
            del planted[key]  # a planted entry under what is replaced now is gone (the test did it)
        _remove(p)
        if kind == "missing":
            continue
        if kind == "link-out-dir":
            p.symlink_to(victim)
        elif kind == "link-out-file":
            p.symlink_to(victim / "precious.txt")
        elif kind == "link-in":
            p.symlink_to(tree / "." if rel else victim)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "dir-for-file":
            p.mkdir()
            (p / "inside.txt").write_text("a user's file")
        elif kind == "file-for-dir":
            p.write_text("a user's file")
        planted[rel] = {"dir-for-file": "dir", "file-for-dir": "file", "fifo": "other"}.get(kind, "link")
    return planted


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """One genuine tree per command, and the inputs the commands read (never damaged)."""
    from stages.data import make_demo_data
    from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups

    root = tmp_path_factory.mktemp("trees")
    make_demo_data(root / "inputs" / "data", labelled=4, unlabelled=2, test=0, size=128, seed=0)

    def ok(*args) -> None:
        res = CliRunner().invoke(cli.app, [str(a) for a in args])
        assert res.exit_code == 0, res.stderr

    data = root / "inputs" / "data"
    src = init_from_preset(PRESETS["tiny"], root / "inputs" / "src", 0, torch.float32, ["test"], False)
    grown = expand_checkpoint(src, root / "inputs" / "grown", GrowthSpec(
        experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=0, noise_std=0.01), ["test"])
    train = ["train", "--stage", 1, "--from", grown, "--data", data / "A", "--set", "batch_size=4", "--set", "max_steps=2",
             "--set", "checkpoint_every=1", "--set", "lr=0.01"]
    t = root / "templates"
    t.mkdir()
    init_from_preset(PRESETS["tiny"], t / "checkpoint", 1, torch.float32, ["test"], False)
    demo = ["demo-data", "--labelled-scenes", 1, "--unlabelled-scenes", 1, "--test-scenes", 0, "--size", 16]
    ok(*demo, "--out", t / "demo")
    ok(*train, "--run-dir", t / "run")
    shutil.rmtree(t / "run" / "final")  # a run stopped after its step-1 checkpoint: the rerun resumes it
    pseudo = ["pseudo-label", src, "--images", data / "B"]
    ok(*pseudo, "--out", t / "pseudo")
    (t / "plot").mkdir()
    shutil.copytree(t / "run", t / "plot" / "run", symlinks=True)
    (t / "pseudo" / "masks" / sorted(os.listdir(t / "pseudo" / "masks"))[0]).unlink()  # the rerun has work
    ok("plot", t / "plot" / "run", "--out", t / "plot" / "plots")
    commands = {
        "checkpoint": lambda tree: ["init", "--preset", "tiny", "--out", tree, "--force"],
        "demo": lambda tree: [*demo, "--out", tree, "--force"],
        "run": lambda tree: [*train, "--run-dir", tree],
        "pseudo": lambda tree: [*pseudo, "--out", tree],
        "plot": lambda tree: ["plot", tree / "run", "--out", tree / "plots", "--force", "--format", "svg"],
    }
    entries = {name: _walk(t / name) for name in commands}
    return t, root / "inputs", commands, entries


# how often each tree is drawn: the cheap commands more often (a damaged tree is mostly refused in milliseconds,
# an accepted one costs a command: ~0.1 s for init or demo-data, ~1 s for a training step or three figures)
WEIGHTS = {"checkpoint": 3, "demo": 3, "pseudo": 2, "run": 2, "plot": 1}


@st.composite
def tree_cases(draw, entries: dict[str, list[str]]):
    name = draw(st.sampled_from([n for n, w in WEIGHTS.items() for _ in range(w)]))
    damage = draw(st.lists(st.tuples(st.sampled_from(DAMAGE), st.sampled_from(entries[name]), st.sampled_from(NAMES)),
                           min_size=1, max_size=3))
    return name, damage


@pytest.mark.slow  # 200 generated trees, each a real command
@TREES
@given(data=st.data())
def test_fuzz_generated_trees(templates, data):
    import signal

    t, inputs, commands, entries = templates
    name, damage = data.draw(tree_cases(entries))
    root = Path(tempfile.mkdtemp(prefix="samoe-tree-"))
    try:
        victim = root / "victim"
        victim.mkdir()
        (victim / "precious.txt").write_text("a user's file outside the tree")
        (victim / "step-1").mkdir()
        (victim / "step-1" / "thesis.tex").write_text("years of work")
        tree = Path(shutil.copytree(t / name, root / name, symlinks=True))
        planted = _damage(tree, victim, damage)
        outside, inputs_before = _state(victim), _state(inputs)

        def hang(signum, frame):  # a BaseException: no command's error handling may take it for bad input
            raise KeyboardInterrupt(f"{name} {damage} still running after 120 s")

        old = signal.signal(signal.SIGALRM, hang)
        signal.alarm(120)
        cpu = time.process_time()
        try:
            res = CliRunner().invoke(cli.app, [str(a) for a in commands[name](tree)])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        code, err = res.exit_code, res.stderr
        assert time.process_time() - cpu < SECONDS, f"{name} {damage} took {time.process_time() - cpu:.1f} s of CPU"
        assert peak_rss() - _PEAK["before"] < MEMORY
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert code in (0, 2), (name, damage, code, err[-800:])
        if code == 2:
            assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert _state(victim) == outside, f"{name} {damage} changed a folder outside the tree"
        assert _state(inputs) == inputs_before, f"{name} {damage} changed its inputs"
        after = _state(tree) if tree.is_dir() and not tree.is_symlink() else {}
        for rel, kind in planted.items():
            p = tree / rel if rel else tree
            assert os.path.lexists(p), f"{name} {damage} deleted {rel or name}, which samoe did not write ({code}: {err})"
            if rel:
                assert after[rel][0] == kind, f"{name} {damage} replaced {rel} ({code}: {err})"
        assert sorted(os.listdir(root)) == sorted(["victim", name]), "something was left beside the tree"
    finally:
        shutil.rmtree(root, ignore_errors=True)
