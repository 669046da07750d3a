"""Tests for upscale/expand.py: growth of a flat SamMoE checkpoint into expert groups.

Oracles: outputs of the source model on the same inputs (growth must preserve
the function), tensors read back straight from the safetensors shards and
compared with the recipes recorded in `samoe.json` (recomputed here), the
growth rules of the module docstrings worked by hand, BLAKE3 of the shard
files, and gradients of a plain SGD step.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors.torch import load_file

import upscale
from upscale import Checkpoint, load_model, save_model
from upscale.checkpoint import build_meta
from upscale.config import PRESETS, SAM_VITS, MoEConfig, SamMoEConfig
from upscale.create import init_from_preset
from upscale.errors import SamoeError
from upscale.expand import GrowthSpec, expand_checkpoint, resolve_groups
from upscale.model import build_model

TINY = PRESETS["tiny"]  # 4 experts, top-2, MoE in encoder blocks 2, 3 and both decoder layers
S = 4
HEADS = ("seg", "sdf", "boundary")
PARAMS = ("w1", "b1", "w2", "b2")
TOL = 1e-5

# Docstring rule for S = 4 source experts and 9 new ones (13 experts, groups 4,3,3,3):
# new expert j copies j mod 4; its interpolation partner is (a + 1 + (j // 4) mod 3) mod 4.
HAND_COPY = [0, 1, 2, 3, 0, 1, 2, 3, 0]
HAND_PARTNER = [1, 2, 3, 0, 2, 3, 0, 1, 3]

_COPY = re.compile(r"^copy-noise:(?P<src>[\w.]+)\[(?P<a>\d+)\]:(?P<std>[^:]+)$")
_INTERP = re.compile(r"^interpolate:(?P<src>[\w.]+)\[(?P<a>\d+)\]:(?P<src2>[\w.]+)\[(?P<b>\d+)\]:(?P<w>[^:]+)$")


# --------------------------------------------------------------------------- helpers and fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("source") / "tiny"
    return init_from_preset(TINY, out, 0, torch.float32, ["test"], False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def src_out(src: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return _forward(load_model(src), images)


@pytest.fixture(scope="module")
def src_tensors(src: Path) -> dict[str, torch.Tensor]:
    return _tensors(src)


def _forward(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(images)
    return {h: out[h].double() for h in HEADS}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _meta(path: Path) -> dict:
    return json.loads((path / "samoe.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with safetensors directly (not through upscale)."""
    out: dict[str, torch.Tensor] = {}
    for fname in _meta(path)["files"]:
        out.update(load_file(str(path / fname)))
    return out


def _grow(src: Path, out: Path, experts: int, groups: str, command: list[str] | None = None, workers: int = 2,
          shard_bytes: int = 2 * 1024**3, **options) -> Path:
    sizes = resolve_groups(S, experts, groups, options.get("core_groups", 1))
    spec = GrowthSpec(experts=experts, groups=sizes, **options)
    return expand_checkpoint(src, out, spec, command or ["samoe", "expand", str(src)], workers=workers, shard_bytes=shard_bytes)


def _moe_prefixes(cfg: SamMoEConfig, blocks: range | None = None) -> list[str]:
    blocks = range(cfg.depth) if blocks is None else blocks
    enc = [f"image_encoder.blocks.{i}.mlp" for i in blocks if cfg.is_moe_block(i)]
    return enc + [f"mask_decoder.transformer.layers.{i}.mlp" for i in range(cfg.decoder_depth)]


def _exact_until_changed(out: Path, images: torch.Tensor, src_out: dict[str, torch.Tensor], change) -> None:
    """The grown checkpoint `out` computes the source's outputs `src_out`; after `change(model)` (in no_grad) it
    does not: the check is not vacuous."""
    model = load_model(out)
    grown = _forward(model, images)
    for h in HEADS:
        assert _rel(src_out[h], grown[h]) <= TOL, (h, _rel(src_out[h], grown[h]))
    with torch.no_grad():
        change(model)
    changed = _forward(model, images)
    assert max(_rel(src_out[h], changed[h]) for h in HEADS) > 1e-4


def _set_group_scales(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".router.group_scale"):
                p.fill_(value)


# --------------------------------------------------------------------------- 6. resolve_groups by hand


@pytest.mark.parametrize(
    ("source", "experts", "groups", "core", "expected"),
    [
        # 101 new over 7 groups: 14 each, 3 left -> 15,15,15,14,14,14,14
        (16, 117, "8", 1, (16, 15, 15, 15, 14, 14, 14, 14)),
        # core 16 split 8,8; 101 new over 6 groups: 16 each, 5 left -> 17 x5, 16
        (16, 117, "8", 2, (8, 8, 17, 17, 17, 17, 17, 16)),
        (4, 11, "4", 1, (4, 3, 2, 2)),
        (4, 13, "4", 1, (4, 3, 3, 3)),
        (4, 13, "5", 2, (2, 2, 3, 3, 3)),
        (5, 12, "3", 2, (3, 2, 7)),
        (16, 117, "16,15,15,15,14,14,14,14", 1, (16, 15, 15, 15, 14, 14, 14, 14)),
        (16, 117, "8,8,20,81", 2, (8, 8, 20, 81)),
        (4, 13, " 4, 2,7 ", 1, (4, 2, 7)),
    ],
)
def test_resolve_groups_by_hand(source, experts, groups, core, expected):
    assert resolve_groups(source, experts, groups, core) == expected


@pytest.mark.parametrize(
    ("source", "experts", "groups", "core", "match"),
    [
        (16, 15, "8", 1, "fewer"),
        (16, 117, "16,15,15,15,14,14,14,13", 1, "sums to 116"),
        (4, 13, "3,5,5", 1, "core group"),
        (4, 13, "5,4,4", 1, "core group"),
        (4, 13, "2,1,5,5", 2, "core group"),
        (4, 13, "8", 3, "core_groups"),
        (4, 6, "4", 1, "new group"),  # 3 new groups for 2 new experts
        (4, 8, "1", 1, "new group"),
        (4, 8, "4,4", 2, "besides"),
        (4, 8, "4,x", 1, "comma-separated"),
        (4, 8, "4,0,4", 1, "at least one expert"),
    ],
)
def test_resolve_groups_rejects(source, experts, groups, core, match):
    with pytest.raises(SamoeError, match=match):
        resolve_groups(source, experts, groups, core)


# --------------------------------------------------------------------------- 1. function preserved


PRESERVING = {
    "13-ragged-4,3,3,3": dict(experts=13, groups="4,3,3,3", noise_std=0.0),
    "13-groups4-extra1": dict(experts=13, groups="4", noise_std=0.0, extra_blocks=1),
    "11-groups4-ragged": dict(experts=11, groups="4", noise_std=0.0, extra_blocks=1),
    "core2-2,2,3,3": dict(experts=10, groups="2,2,3,3", core_groups=2, noise_std=0.0),
    "core2-groups5-extra1": dict(experts=13, groups="5", core_groups=2, noise_std=0.0, extra_blocks=1),
    "interpolate-extra1": dict(experts=13, groups="4", init="interpolate", extra_blocks=1),
    "mixed-noise0.5-extra2": dict(experts=13, groups="4", init="mixed", noise_std=0.5, extra_blocks=2),
    "copy-noise0.5-extra1": dict(experts=13, groups="4,3,3,3", noise_std=0.5, extra_blocks=1),
    "topk-groups2-noise0.5": dict(experts=13, groups="4", top_k_groups=2, noise_std=0.5),
    "routed-top-k1-noise0.5": dict(experts=13, groups="4", routed_top_k=1, noise_std=0.5, extra_blocks=1),
    "extra-dense": dict(experts=13, groups="4", noise_std=0.0, extra_blocks=1, extra_dense=True),
}


@pytest.mark.parametrize("case", list(PRESERVING))
def test_growth_preserves_function(case, src, images, src_out, tmp_path):
    options = dict(PRESERVING[case])
    out = _grow(src, tmp_path / "grown", **options)
    cfg = Checkpoint.open(out).config
    assert cfg.moe.num_experts == options["experts"]
    assert cfg.moe.core_groups == options.get("core_groups", 1)
    assert cfg.total_blocks == TINY.depth + options.get("extra_blocks", 0)
    if case == "11-groups4-ragged":
        assert cfg.moe.groups == (4, 3, 2, 2)
    assert cfg.moe.k_routed == (options.get("routed_top_k") or TINY.moe.top_k)
    model = load_model(out)
    grown = _forward(model, images)
    for h in HEADS:
        assert _rel(src_out[h], grown[h]) <= TOL, (case, h, _rel(src_out[h], grown[h]))
    # Not vacuous: the new groups do compute something, it is hidden by group_scale = 0 alone.
    scales = [p for n, p in model.named_parameters() if n.endswith(".router.group_scale")]
    assert scales and all(torch.equal(s, torch.zeros_like(s)) for s in scales)
    _set_group_scales(model, 1.0)
    opened = _forward(model, images)
    assert max(_rel(src_out[h], opened[h]) for h in HEADS) > 1e-3


@pytest.mark.parametrize("extra_blocks", [0, 1])
def test_replicate_copies_the_pool_and_preserves_function(extra_blocks, src, src_tensors, images, src_out, tmp_path):
    """--replicate: 4 groups, each the source's 4 experts and router rows bit for bit (group 0 keeps provenance
    `source`, the others are `copy:`), no core pool, group scales 1; the grown model computes the source's
    function up to float rounding. Not vacuous: changing one replica changes the output."""
    spec = GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, noise_std=0.0, extra_blocks=extra_blocks)
    out = expand_checkpoint(src, tmp_path / "rep", spec, ["samoe", "expand", str(src)])
    cfg, t, prov = Checkpoint.open(out).config, _tensors(out), _meta(out)["provenance"]
    assert cfg.moe.replicas and cfg.moe.core_groups == 0 and cfg.moe.groups == (4, 4, 4, 4) and cfg.moe.k_routed == TINY.moe.top_k
    for prefix in _moe_prefixes(TINY):
        for g in range(4):
            names = [(f"{prefix}.experts.{g}.{p}", f"{prefix}.experts.0.{p}") for p in PARAMS]
            names.append((f"{prefix}.router.expert_gates.{g}.weight", f"{prefix}.router.expert_gates.0.weight"))
            for name, src_name in names:
                assert torch.equal(t[name], src_tensors[src_name]), name
                assert prov[name] == ("source" if g == 0 else [f"copy:{src_name}[{e}]" for e in range(S)]), name
        assert torch.equal(t[f"{prefix}.router.group_scale"], torch.ones(4))
    new = f"image_encoder.blocks.{TINY.depth}.mlp"
    for g in range(4 if extra_blocks else 0):  # the extra block's replicas start as the identity
        assert not t[f"{new}.experts.{g}.w2"].any() and not t[f"{new}.experts.{g}.b2"].any()
    _exact_until_changed(out, images, src_out, lambda m: m.image_encoder.blocks[2].mlp.experts[3].w2.mul_(2.0))


@pytest.mark.parametrize(("options", "words"), [
    (dict(noise_std=0.01), "drop init and noise_std"),
    (dict(noise_std=0.0, init="interpolate"), "drop init"),
    (dict(noise_std=0.0, routed_top_k=1), "drop routed_top_k"),
])
def test_replicate_rejects_what_would_break_exactness(options, words, src, tmp_path):
    spec = GrowthSpec(experts=16, groups=(4, 4, 4, 4), core_groups=0, replicate=True, **options)
    with pytest.raises(SamoeError, match=re.escape(words)):
        expand_checkpoint(src, tmp_path / "rep", spec, ["samoe", "expand", str(src)])
    assert not (tmp_path / "rep").exists()


def test_resolve_replicas_by_hand():
    from upscale.expand import resolve_replicas

    assert resolve_replicas(16, 128, "8") == (16,) * 8
    assert resolve_replicas(4, 16, "4,4,4,4") == (4, 4, 4, 4)
    for experts, groups, words in ((117, "8", "pass --experts 128"), (16, "4,4,8", "of the source's 4 experts each"),
                                   (4, "1", "need 2 or more groups"), (16, "x", "must be a number")):
        with pytest.raises(SamoeError, match=re.escape(words)):
            resolve_replicas(4 if experts != 117 else 16, experts, groups)


@pytest.mark.slow  # 8 s: a ViT-B-width model
def test_vit_b_shaped_growth_preserves_function(tmp_path):
    """vit_b widths (768 wide, 12 heads, 3072 MLP, 256 decoder) at a cheap depth and resolution."""
    vit = dict(SAM_VITS["vit_b"], depth=4, global_attn_indexes=(1, 3))
    cfg = SamMoEConfig(**vit, img_size=256, moe_blocks=(2, 3), out_chans=256,
                       moe=MoEConfig(groups=(4,), core_groups=1, top_k=2)).validate()
    model = build_model(cfg, seed=5)
    meta = build_meta(cfg, {name: "random" for name in model.state_dict()}, [], [], torch.float32)
    src = save_model(model, tmp_path / "vitb", meta)
    spec = GrowthSpec(experts=6, groups=resolve_groups(4, 6, "2", 1), extra_blocks=1, noise_std=0.0)
    assert spec.groups == (4, 2)
    out = expand_checkpoint(src, tmp_path / "vitb-grown", spec, ["test"], workers=2)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(9))
    a = _forward(model, x)
    del model
    grown = load_model(out)
    assert grown.config.embed_dim == 768 and grown.config.total_blocks == 5
    b = _forward(grown, x)
    for h in HEADS:
        assert _rel(a[h], b[h]) <= TOL, (h, _rel(a[h], b[h]))


# --------------------------------------------------------------------------- 2. what the new tensors are


@pytest.fixture(scope="module")
def noisy(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("noisy") / "grown"
    return _grow(src, out, experts=13, groups="4", noise_std=0.1, seed=3, extra_blocks=1)


def test_core_groups_are_the_source_and_new_routing_is_gated_off(noisy, src_tensors):
    t, meta = _tensors(noisy), _meta(noisy)
    for prefix in _moe_prefixes(TINY):
        for p in PARAMS:
            assert torch.equal(t[f"{prefix}.experts.0.{p}"], src_tensors[f"{prefix}.experts.0.{p}"])
            assert meta["provenance"][f"{prefix}.experts.0.{p}"] == "source"
        gate = f"{prefix}.router.expert_gates.0.weight"
        assert torch.equal(t[gate], src_tensors[gate])
        assert torch.equal(t[f"{prefix}.router.group_scale"], torch.zeros(3))
        g = t[f"{prefix}.router.group_gate.weight"]
        assert g.shape == (3, t[gate].shape[1]) and 0.015 < float(g.std()) < 0.025
    # every tensor outside the MoE layers and the new block is copied unchanged
    for name, v in src_tensors.items():
        if ".mlp.experts." not in name and ".mlp.router." not in name:
            assert torch.equal(t[name], v), name


def test_copy_noise_experts_follow_recorded_recipe(noisy, src_tensors):
    t, prov = _tensors(noisy), _meta(noisy)["provenance"]
    sigma = 0.1
    checked = 0
    layers = {p: p for p in _moe_prefixes(TINY)}
    layers["image_encoder.blocks.4.mlp"] = "image_encoder.blocks.3.mlp"  # the extra block copies block 3
    for prefix, sprefix in layers.items():
        j = 0
        for g, size in enumerate((4, 3, 3, 3)):
            if g == 0:
                continue
            pairs = [(p, f"{prefix}.experts.{g}.{p}", f"{sprefix}.experts.0.{p}") for p in PARAMS]
            pairs.append(("gate", f"{prefix}.router.expert_gates.{g}.weight", f"{sprefix}.router.expert_gates.0.weight"))
            for p, name, src_name in pairs:
                entries = prov[name]
                assert isinstance(entries, list) and len(entries) == size and t[name].shape[0] == size
                for i, entry in enumerate(entries):
                    m = _COPY.match(entry)
                    assert m, entry
                    a = int(m["a"])
                    assert m["src"] == src_name and float(m["std"]) == sigma
                    assert a == HAND_COPY[j + i]
                    base = src_tensors[src_name][a]
                    diff = t[name][i] - base
                    assert (diff != 0).float().mean() > 0.99  # differs from its source expert
                    ratio = float(diff.double().std()) / (sigma * float(base.double().std()))
                    # w1/w2 slices have 16384 entries: the sample std is within ~1%
                    lo, hi = (0.9, 1.1) if diff.numel() >= 4096 else (0.6, 1.4)
                    assert lo < ratio < hi, (name, i, ratio)
                    checked += 1
            j += size
    assert checked == len(layers) * 9 * 5


def test_router_rows_follow_their_experts(noisy):
    prov = _meta(noisy)["provenance"]
    for prefix in _moe_prefixes(TINY):
        for g in (1, 2, 3):
            rows = [_COPY.match(e)["a"] for e in prov[f"{prefix}.router.expert_gates.{g}.weight"]]
            for p in PARAMS:
                assert [_COPY.match(e)["a"] for e in prov[f"{prefix}.experts.{g}.{p}"]] == rows


def test_extra_block_starts_as_identity_copy_of_last_global_block(noisy, src_tensors):
    """attn.proj and the core experts' w2/b2 are zero; the rest copies block 3; new groups follow recipes."""
    t, prov = _tensors(noisy), _meta(noisy)["provenance"]
    new, tpl = "image_encoder.blocks.4.", "image_encoder.blocks.3."  # global blocks are (1, 3)
    names = [n for n in t if n.startswith(new)]
    assert len(names) == len([n for n in src_tensors if n.startswith(tpl)]) + 3 * 5 + 2
    for name in names:
        rest = name[len(new):]
        if rest.startswith("attn.proj.") or rest in ("mlp.experts.0.w2", "mlp.experts.0.b2"):
            assert torch.equal(t[name], torch.zeros_like(t[name])), name
            assert prov[name] == "identity-new"
        elif rest == "mlp.router.group_scale":
            assert torch.equal(t[name], torch.zeros(3))
        elif rest == "mlp.router.group_gate.weight":
            assert prov[name] == "random"
        elif rest.startswith(("mlp.experts.0.", "mlp.router.expert_gates.0.")):
            assert torch.equal(t[name], src_tensors[tpl + rest]), name
            assert prov[name] == [f"copy:{tpl}{rest}[{e}]" for e in range(S)]
        elif rest.startswith(("mlp.experts.", "mlp.router.expert_gates.")):
            # new groups: not zeroed (group_scale = 0 hides them), made like the source-depth ones
            assert float((t[name] != 0).double().mean()) > 0.99, name
            assert all(e.startswith("copy-noise:" + tpl) for e in prov[name]), name
        else:
            assert torch.equal(t[name], src_tensors[tpl + rest]), name
            assert prov[name] == f"copy:{tpl}{rest}"


@pytest.mark.parametrize("w", [0.3, 0.75])
def test_interpolated_experts_are_exact_mixtures(w, src, src_tensors, tmp_path):
    out = _grow(src, tmp_path / "interp", experts=13, groups="4", init="interpolate", interp_weight=w, noise_std=0.5)
    t, prov = _tensors(out), _meta(out)["provenance"]
    for prefix in _moe_prefixes(TINY):
        j = 0
        for g in (1, 2, 3):
            names = [(f"{prefix}.experts.{g}.{p}", f"{prefix}.experts.0.{p}") for p in PARAMS]
            names.append((f"{prefix}.router.expert_gates.{g}.weight", f"{prefix}.router.expert_gates.0.weight"))
            for name, src_name in names:
                for i, entry in enumerate(prov[name]):
                    m = _INTERP.match(entry)
                    assert m, entry
                    a, b = int(m["a"]), int(m["b"])
                    assert m["src"] == m["src2"] == src_name and float(m["w"]) == w
                    assert (a, b) == (HAND_COPY[j + i], HAND_PARTNER[j + i]) and a != b
                    A, B = src_tensors[src_name][a], src_tensors[src_name][b]
                    assert torch.equal(t[name][i], w * A + (1.0 - w) * B), (name, i)
                    assert torch.allclose(t[name][i].double(), w * A.double() + (1 - w) * B.double(), rtol=0, atol=1e-6)
            j += 3


def test_mixed_alternates_copy_noise_and_interpolate(src, tmp_path):
    out = _grow(src, tmp_path / "mixed", experts=13, groups="4", init="mixed", noise_std=0.2)
    prov = _meta(out)["provenance"]
    entries = sum((prov[f"image_encoder.blocks.2.mlp.experts.{g}.w1"] for g in (1, 2, 3)), [])
    kinds = [e.split(":", 1)[0] for e in entries]
    assert kinds == ["copy-noise", "interpolate"] * 4 + ["copy-noise"]
    for j, e in enumerate(entries):
        m = _COPY.match(e) or _INTERP.match(e)
        assert int(m["a"]) == HAND_COPY[j]
        if j % 2:
            assert int(m["b"]) == HAND_PARTNER[j]


def test_new_groups_deviate_more_with_more_noise(src, images, tmp_path):
    """With every group_scale opened to 1, the new groups' contribution grows with the noise."""
    outs = {}
    for sigma in (0.0, 0.01, 0.1, 0.5):
        path = _grow(src, tmp_path / f"n{sigma}", experts=13, groups="4", noise_std=sigma, seed=11)
        model = load_model(path)
        _set_group_scales(model, 1.0)
        outs[sigma] = _forward(model, images)
    for h in HEADS:
        d = [_rel(outs[0.0][h], outs[s][h]) for s in (0.01, 0.1, 0.5)]
        assert 0 < d[0] < d[1] < d[2], (h, d)


# --------------------------------------------------------------------------- 3. learning is not blocked


@pytest.fixture(scope="module")
def sgd_run(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Grow (noise 0, 1 extra block), take 2 plain SGD steps (lr 0.1), record gradients and routing."""
    out = _grow(src, tmp_path_factory.mktemp("learn") / "grown", experts=13, groups="4", noise_std=0.0, extra_blocks=1)
    model = load_model(out).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7)
    size, c = TINY.img_size, TINY.num_classes

    def batch():
        x = torch.randn(4, 3, size, size, generator=gen)
        shapes = {"seg": (4, c, size, size), "sdf": (4, c, size, size), "boundary": (4, 1, size, size)}
        return x, {h: torch.randn(*shapes[h], generator=gen) for h in HEADS}

    params = dict(model.named_parameters())
    layers = dict(model.moe_layers())
    assert sorted(layers) == sorted(_moe_prefixes(TINY, range(TINY.depth + 1)))  # blocks 2, 3, 4 (extra), decoder 0, 1
    got_grad = {n: False for n in params}
    scale_grad, step1_groups, expert_ok = {}, {}, {}
    group_tokens = {name: torch.zeros(4, dtype=torch.long) for name in layers}
    for step in range(2):
        x, targets = batch()
        opt.zero_grad()
        y = model(x)
        loss = sum(((y[h] - targets[h]) ** 2).mean() for h in HEADS) + model.aux_loss()
        assert torch.isfinite(loss)
        loss.backward()
        for n, p in params.items():
            got_grad[n] |= p.grad is not None and bool((p.grad != 0).any())
        for name, layer in layers.items():
            group_tokens[name] += layer.group_counts
            if step == 0:
                g = params[f"{name}.router.group_scale"].grad
                scale_grad[name] = torch.zeros(3) if g is None else g.clone()
                step1_groups[name] = layer.group_counts.clone()
            # expert by expert: an expert of a new group that received tokens must get gradient in its
            # slices (at step 2, once the scales are open; at step 1 they are exactly zero)
            offsets = layer.cfg.offsets
            for g in range(1, len(offsets) - 1 if step == 1 else 1):
                for i in range(offsets[g + 1] - offsets[g]):
                    if layer.expert_counts[offsets[g] + i] == 0:
                        continue
                    slices = [params[f"{name}.experts.{g}.{p}"] for p in PARAMS]
                    slices.append(params[f"{name}.router.expert_gates.{g}.weight"])
                    ok = all(t.grad is not None and bool((t.grad[i] != 0).any()) for t in slices)
                    expert_ok[(name, g, i)] = ok
        opt.step()
    seen = {name: torch.zeros(4, dtype=torch.long) for name in layers}
    with torch.no_grad():
        for _ in range(3):
            model(batch()[0])
            for name, layer in layers.items():
                seen[name] += layer.group_counts.cpu()
    scales = {name: params[f"{name}.router.group_scale"].detach().clone() for name in layers}
    return dict(params=list(params), got_grad=got_grad, scale_grad=scale_grad, step1_groups=step1_groups,
                expert_ok=expert_ok, seen=seen, scales=scales, group_tokens=group_tokens)


LAYER_SETS = [
    pytest.param("encoder", id="encoder-source-depth"),
    # regression: extra blocks once zeroed every group's w2/b2, so with group_scale = 0 too their new
    # groups sat on a saddle and never got gradient
    pytest.param("extra", id="encoder-extra-block"),
    # regression: decoder layers route only 2C+1 tokens per image; with sparse group routing some new
    # groups never got a token (nor a gradient). They now mix every routed group.
    pytest.param("decoder", id="decoder"),
]


def _in_set(layer: str, which: str) -> bool:
    if layer.startswith("mask_decoder."):
        return which == "decoder"
    extra = int(layer.split(".")[2]) >= TINY.depth
    return which == ("extra" if extra else "encoder")


@pytest.mark.parametrize("which", LAYER_SETS)
def test_group_scales_get_gradient_at_step_one(which, sgd_run):
    layers = [n for n in sgd_run["scale_grad"] if _in_set(n, which)]
    assert layers
    for name in layers:
        assert bool((sgd_run["step1_groups"][name][1:] > 0).all()), (name, sgd_run["step1_groups"][name])
        assert bool((sgd_run["scale_grad"][name] != 0).all()), (name, sgd_run["scale_grad"][name])
        assert bool((sgd_run["scales"][name] != 0).all()), (name, sgd_run["scales"][name])


@pytest.mark.parametrize("which", LAYER_SETS)
def test_routers_and_new_groups_get_gradient_within_two_steps(which, sgd_run):
    def layer_of(n):
        return re.sub(r"\.(router|experts)\..*", "", n)

    def tokenless(n):  # parameters of a group that got no tokens in either step are exempt
        m = re.search(r"\.(?:experts|router\.expert_gates)\.(\d+)\.", n)
        return m is not None and int(sgd_run["group_tokens"][layer_of(n)][int(m[1])]) == 0

    router = [n for n in sgd_run["params"] if ".router." in n]
    new = [n for n in sgd_run["params"]
           if re.search(r"\.mlp\.(experts|router\.expert_gates)\.[1-9]\d*\.", n) or ".router.group_gate." in n]
    names = [n for n in dict.fromkeys(router + new) if _in_set(layer_of(n), which) and not tokenless(n)]
    assert len(names) > 10
    missing = sorted(n for n in names if not sgd_run["got_grad"][n])
    assert not missing, missing
    experts = {k: v for k, v in sgd_run["expert_ok"].items() if _in_set(k[0], which)}
    assert experts and all(experts.values()), sorted(k for k, v in experts.items() if not v)


@pytest.mark.parametrize("which", [
    pytest.param("image_encoder.", id="encoder"),
    pytest.param("mask_decoder.", id="decoder"),
])
def test_every_new_group_receives_tokens(which, sgd_run):
    seen = {n: v for n, v in sgd_run["seen"].items() if n.startswith(which)}
    assert seen
    for name, total in seen.items():
        assert bool((total > 0).all()), (name, total)


# --------------------------------------------------------------------------- 4. determinism


def _digests(path: Path) -> dict[str, str]:
    return {name: v["blake3"] for name, v in _meta(path)["files"].items()}


def test_growth_is_deterministic_across_workers_and_shards(src, tmp_path):
    opts = dict(experts=13, groups="4", noise_std=0.05, extra_blocks=1, seed=5)
    a = _grow(src, tmp_path / "a", workers=1, **opts)
    b = _grow(src, tmp_path / "b", workers=3, **opts)
    c = _grow(src, tmp_path / "c", workers=1, shard_bytes=1_000_000, **opts)
    d = _grow(src, tmp_path / "d", workers=3, shard_bytes=1_000_000, **opts)
    e = _grow(src, tmp_path / "e", workers=2, **dict(opts, seed=6))
    for p in (a, b, c, d, e):  # recorded digests are the files' digests
        for name, digest in _digests(p).items():
            assert blake3((p / name).read_bytes()).hexdigest() == digest
    assert len(_digests(a)) == 1 and _digests(a) == _digests(b)
    assert len(_digests(c)) > 2 and _digests(c) == _digests(d)
    assert Checkpoint.open(a).digest == Checkpoint.open(b).digest
    assert _digests(e) != _digests(a)
    ta, tc = _tensors(a), _tensors(c)
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)


def _grow_as(src: Path, out: Path, dtype: torch.dtype | None, workers: int, **options) -> dict[str, torch.Tensor]:
    spec = GrowthSpec(experts=13, groups=resolve_groups(S, 13, "4", 1), **options)
    return _tensors(expand_checkpoint(src, out, spec, ["samoe", "expand"], dtype=dtype, workers=workers))


@pytest.mark.parametrize("init", ["copy-noise", "mixed"])
def test_conversion_in_the_workers_equals_converting_the_source_dtype_result(init, src, tmp_path):
    """An fp32 source grown into bf16: every tensor (copies, noisy and interpolated experts, the extra block) is the fp32 growth's tensor rounded to bf16, whatever the worker count; and a bf16
    source grown into fp32 is its bf16 growth widened exactly (but the new group routers, which are drawn
    at the output's precision)."""
    opts = dict(init=init, noise_std=0.05, extra_blocks=1, seed=3)
    wide = _grow_as(src, tmp_path / "fp32", None, 2, **opts)
    for workers in (1, 3):
        narrow = _grow_as(src, tmp_path / f"bf16-{workers}", torch.bfloat16, workers, **opts)
        assert narrow.keys() == wide.keys()
        for name, t in wide.items():
            assert narrow[name].dtype == torch.bfloat16
            assert torch.equal(narrow[name].view(torch.int16), t.to(torch.bfloat16).view(torch.int16)), name
    half = init_from_preset(TINY, tmp_path / "bf16-source", 0, torch.bfloat16, ["test"], False)
    same = _grow_as(half, tmp_path / "bf16-same", None, 2, **opts)
    widened = _grow_as(half, tmp_path / "bf16-to-fp32", torch.float32, 2, **opts)
    for name, t in same.items():
        assert widened[name].dtype == torch.float32 and torch.equal(widened[name].to(torch.bfloat16), t), name
        assert name.endswith(".router.group_gate.weight") or torch.equal(widened[name], t.float()), name


@pytest.mark.parametrize("init", ["copy-noise", "interpolate"])
def test_new_bank_is_made_in_the_output_dtype_without_a_source_precision_copy(init):
    """The worker allocates the bank once, in the output dtype (no float32 bank to convert afterwards), and its
    bytes are the source-dtype bank rounded to bf16."""
    from upscale.expand import make_new_bank, new_expert_recipe

    source = torch.randn(4, 96, 32, generator=torch.Generator().manual_seed(0))
    spec = GrowthSpec(experts=10, groups=(4, 3, 3), init=init, noise_std=0.05)
    recipes = [new_expert_recipe(spec, j, 4) for j in range(6)]
    asked = []

    def empty(shape, dtype):
        asked.append(dtype)
        return torch.empty(shape, dtype=dtype)

    fused = make_new_bank(source, recipes, spec, 11, empty=empty, dtype=torch.bfloat16)
    assert asked == [torch.bfloat16]
    reference = make_new_bank(source, recipes, spec, 11).to(torch.bfloat16)
    assert torch.equal(fused.view(torch.int16), reference.view(torch.int16))


def test_source_cache_reads_a_tensor_once_however_many_workers_want_it():
    """Single-flight reads: 4 threads asking at once cause one read; a failed read fails every waiter
    and leaves nothing behind, so the next call reads again."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from upscale.expand import SourceCache

    class Slow:
        def __init__(self) -> None:
            self.reads: list[str] = []
            self.fail = False
            self.gate = threading.Barrier(4)

        def get(self, name: str) -> torch.Tensor:
            self.reads.append(name)
            time.sleep(0.2)  # the other callers arrive while this read is in flight
            if self.fail:
                raise SamoeError("disk error")
            return torch.ones(3, 2, dtype=torch.bfloat16)

    ckpt = Slow()
    cache = SourceCache(ckpt, budget_bytes=1 << 20)

    def call(name: str):
        ckpt.gate.wait()
        try:
            return cache(name)
        except SamoeError as e:
            return e

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, ["a.experts.0.w1"] * 4))
    assert ckpt.reads == ["a.experts.0.w1"] and all(t is got[0] for t in got)
    assert cache.row_std("a.experts.0.w1", 1) == 0.0 and ckpt.reads == ["a.experts.0.w1"]
    ckpt.fail = True
    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(call, ["b"] * 4))
    assert ckpt.reads.count("b") == 1 and all(isinstance(e, SamoeError) for e in errors)
    ckpt.fail = False
    assert torch.equal(cache("b"), torch.ones(3, 2, dtype=torch.bfloat16)) and ckpt.reads.count("b") == 2


# --------------------------------------------------------------------------- 8. lineage


def test_lineage_records_parent_command_seed_version(src, tmp_path):
    command = ["samoe", "expand", str(src), "--out", str(tmp_path / "lin"), "--experts", "13", "--seed", "42"]
    out = _grow(src, tmp_path / "lin", experts=13, groups="4", seed=42, command=command)
    parent = Checkpoint.open(src)
    lineage = _meta(out)["lineage"]
    assert lineage[:-1] == parent.lineage and len(lineage) == len(parent.lineage) + 1
    last = lineage[-1]
    assert last["parent_digest"] == parent.digest and last["parent_digest"].startswith("sha256:")
    assert last["parent"] == str(src.resolve())
    assert last["command"] == " ".join(command)
    assert last["seed"] == 42
    assert last["version"] == upscale.__version__
    assert _meta(out)["growth"]["groups"] == [4, 3, 3, 3]


# --------------------------------------------------------------------------- 9. the fast noise and statistics


def test_quantile_table_noise_is_gaussian_with_the_requested_std():
    """Moments and tails of 4M samples against N(0, s^2): mean 0, std s, kurtosis 3, mass beyond 3 and 4 sigma."""
    from upscale.expand import GaussianNoise

    s = 0.37
    x = GaussianNoise(123).sample(4_000_000, s, torch.float32).double() / s
    assert abs(float(x.mean())) < 0.003  # standard error 5e-4
    assert abs(float(x.std()) - 1.0) < 0.003
    assert abs(float((x**4).mean()) - 3.0) < 0.03
    beyond3 = float((x.abs() > 3).double().mean())
    assert abs(beyond3 - 0.0026998) < 0.0003  # 2 * (1 - Phi(3))
    assert float(x.abs().max()) > 4.3  # the table reaches +-4.33 sigma
    beyond4 = float((x.abs() > 4).double().mean())
    assert 2e-5 < beyond4 < 1.5e-4  # true value 6.3e-5
    # 16-bit indices are uniform: every table entry is hit about equally often
    idx = GaussianNoise(5).indices(65536 * 64)
    counts = torch.bincount(idx, minlength=65536)
    assert int(idx.min()) == 0 and int(idx.max()) == 65535 and counts.numel() == 65536
    assert abs(float(counts.double().std()) - 8.0) < 0.5  # Poisson(64): std 8


def test_noise_is_a_pure_function_of_the_seed():
    from upscale.expand import GaussianNoise

    a, b = GaussianNoise(7), GaussianNoise(7)
    assert torch.equal(a.sample(1001, 1.0, torch.bfloat16), b.sample(1001, 1.0, torch.bfloat16))
    assert not torch.equal(GaussianNoise(8).sample(1001, 1.0, torch.float32), GaussianNoise(7).sample(1001, 1.0, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_stats_match_numpy_std_and_find_non_finite_values(dtype):
    from upscale.expand import row_stats

    bank = (torch.randn(5, 7, 33) * torch.tensor([0.01, 1.0, 3.0, 0.2, 0.0]).view(5, 1, 1) + 0.5).to(dtype)
    stds, finite = row_stats(bank)
    assert finite
    import numpy as np
    ref = [float(np.std(r.double().numpy())) for r in bank]
    assert stds == pytest.approx(ref, rel=1e-9, abs=1e-12)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = bank.clone()
        broken[3, 2, 1] = bad
        assert row_stats(broken)[1] is False


def test_added_noise_is_rounded_once_in_the_storage_dtype():
    """bf16 copy-noise rows equal base + noise computed in float32 and rounded once (the fused add)."""
    from upscale.expand import GaussianNoise

    base = torch.randn(4096).to(torch.bfloat16)
    out = torch.empty_like(base)
    GaussianNoise(3).add_to(base, 0.01, out)
    noise = GaussianNoise(3).sample(4096, 0.01, torch.bfloat16)
    assert torch.equal(out, (base.float() + noise.float()).to(torch.bfloat16))
    assert 0.008 < float((out.float() - base.float()).std()) < 0.012


def test_buffer_pool_recycles_only_its_own_buffers():
    from upscale.expand import BufferPool

    pool = BufferPool(keep=1)
    a = pool.empty((3, 5), torch.bfloat16)
    foreign = torch.empty(15, dtype=torch.bfloat16)
    pool.give_back(foreign)  # not handed out by the pool: never reused
    pool.give_back(a[1:])  # a part of a buffer is not the buffer
    assert pool.empty((3, 5), torch.bfloat16).data_ptr() != a.data_ptr()
    pool.give_back(a)
    b = pool.empty((15,), torch.bfloat16)
    assert b.data_ptr() == a.data_ptr() and b.shape == (15,)
    assert pool.empty((15,), torch.bfloat16).data_ptr() not in (a.data_ptr(), foreign.data_ptr())
