"""Tests for `stages.figures`, `stages.curves`, `stages.report` and `samoe plot`.

Every figure is rendered from small fabricated inputs (an eval report dict and
tiny metrics.csv / selector_log.csv files; no model is built or trained) and
checked without eyes: texts (titles, axis labels, tick labels) read from the
Figure before saving; the numbers drawn (cell images, bar heights, error bars,
line data) against the inputs; that every text lies inside the figure (titles
fit); and the saved files' format, pixel size at 200 dpi and non-blankness.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.image import AxesImage
from matplotlib.text import Text
from PIL import Image
from typer.testing import CliRunner

from stages import curves, figures
from stages.evaluate import METRICS
from stages.report import render_report, write_eval_outputs
from upscale.errors import SamoeError
from upscale.ownership import OWNER_FILE

CLASSES = ["water", "urban", "vegetation", "bare_soil"]
ENC = [f"image_encoder.blocks.{i}.mlp" for i in (2, 3)]
DEC = [f"mask_decoder.transformer.layers.{i}.mlp" for i in (0, 1)]


def _routing(layers: list[str], groups: list[int], rng: np.random.Generator) -> dict:
    out = {}
    for n in layers:
        share = rng.dirichlet(np.ones(sum(groups)))
        gs = np.array([s.sum() for s in np.split(share, np.cumsum(groups)[:-1])])
        cg = rng.dirichlet(np.ones(len(groups)), size=len(CLASSES)) if n.startswith("image_encoder") else np.zeros((4, len(groups)))
        out[n] = {"expert_share": share.tolist(), "group_share": gs.tolist(), "new_share": float(gs[1:].sum()),
                  "new_weight_share": float(gs[1:].sum() / 3), "class_group_share": cg.tolist(), "dead_experts": 0,
                  "load_cv": 0.25, "router_entropy": 1.1, "source_share": float(gs[0])}
    return out


def make_report(paths: tuple[str, str] = ("/r/demo/runs/source/final", "/r/demo/runs/s3/final"), experts: int = 16) -> dict:
    """A source checkpoint (4 experts, one group) and a grown one (`experts` in 4 groups, one more encoder block)."""
    rng = np.random.default_rng(0)
    cks = []
    for k, groups in enumerate(([4], [experts // 4] * 4)):
        layers = ENC + (["image_encoder.blocks.4.mlp"] if k else []) + DEC
        iou = dict(zip(CLASSES, (0.5, 0.6, 0.7, 0.8) if k == 0 else (0.55, 0.6, 0.65, None)))  # bare_soil undefined in [1]
        present = [v for v in iou.values() if v is not None]
        cks.append({"path": paths[k], "digest": "sha256:" + "ab" * 32, "total_params": 10**6 * (k + 1), "stages": [3],
                    "groups": groups, "core_groups": 1, "routing": _routing(layers, groups, rng),
                    "metrics": {"miou": sum(present) / len(present), "mean_dice": 0.6, "pixel_accuracy": 0.8,
                                "boundary_f1": 0.4, "sdf_mae": 0.2, "miou_interior": 0.9, "iou": iou, "dice": iou,
                                "boundary_precision": 0.5, "boundary_recall": 0.4}})
    class_diff = {"water": {"diff": 0.05, "ci_low": -0.01, "ci_high": 0.09}, "urban": {"diff": 0.0, "ci_low": -0.03, "ci_high": 0.02},
                  "vegetation": {"diff": -0.05, "ci_low": -0.08, "ci_high": -0.02},
                  "bare_soil": {"diff": None, "ci_low": None, "ci_high": None}}
    comps = [{"baseline": paths[0], "other": paths[1],
              "diff": {m: {"diff": 0.01, "ci_low": -0.02, "ci_high": 0.04} for m in METRICS}, "class_diff": class_diff}]
    return {"data": "demo/data/A-test", "images": 12, "classes": CLASSES, "bootstrap": 100, "seed": 0,
            "checkpoints": cks, "comparisons": comps}


def texts_inside(fig) -> list[str]:
    """Texts that stick out of the figure; [] when every drawn label and title fits.

    Tick labels count only where matplotlib draws them (ticks inside the view interval).
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    ticks, drawn = set(), []
    for ax in fig.findobj(Axes):
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update((tick.label1, tick.label2))
                if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    drawn += [tick.label1, tick.label2]
    drawn += [t for t in fig.findobj(Text) if t not in ticks]
    out = []
    for t in drawn:
        if not t.get_visible() or not t.get_text().strip():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


def tick_labels(ax, axis: str = "x") -> list[str]:
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


def assert_image(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size == size, (path, im.size)
        assert round(im.info["dpi"][0]) == 200
        assert np.asarray(im.convert("L"), dtype=np.float64).std() > 0, f"{path} is blank"


# --------------------------------------------------------------------------- eval figures


def test_expert_usage_figure_texts_scale_and_groups():
    rep = make_report()
    fig = figures.expert_usage_figure(rep, 1)
    ax = fig.axes[0]
    assert ax.get_title() == "Expert usage per MoE layer: [1] s3/final"
    assert ax.get_xlabel() == "expert id" and ax.get_ylabel() == "MoE layer"
    assert tick_labels(ax, "y") == ["enc 2", "enc 3", "enc 4", "dec 0", "dec 1"]
    assert tick_labels(ax) == [str(i) for i in range(16)]
    top = ax.child_axes[0]  # secondary axis naming the groups over their experts
    assert tick_labels(top) == ["g0 core", "g1 new", "g2 new", "g3 new"]
    assert list(top.get_xticks()) == [1.5, 5.5, 9.5, 13.5]
    # group boundaries between experts 3|4, 7|8, 11|12
    assert sorted({line.get_xdata()[0] for line in ax.get_lines()}) == [3.5, 7.5, 11.5]
    # one colour scale for the whole matrix: values are % of the layer, never rescaled per row
    (im,) = [a for a in ax.get_children() if isinstance(a, AxesImage)]
    usage = np.array([rep["checkpoints"][1]["routing"][n]["expert_share"] for n in ENC + ["image_encoder.blocks.4.mlp"] + DEC])
    np.testing.assert_allclose(im.get_array(), usage * 100)
    assert im.norm.vmin == 0 and im.norm.vmax == pytest.approx(usage.max() * 100)
    (cbar,) = [a for a in fig.axes if a.get_ylabel() == "% of the layer's assignments"]
    assert cbar is not ax
    # 5 x 16 cells: small enough to carry their values
    cells = [t for t in ax.texts]
    assert len(cells) == 80 and cells[0].get_text() == format(usage[0, 0] * 100, ".0f" if usage.max() >= 0.1 else ".1f")
    assert texts_inside(fig) == []


def test_replica_groups_are_labelled_source_and_copies():
    # a replicated model (`expand --replicate`): group 0 holds the source's experts, the others copy them, no core
    rep = make_report()
    rep["checkpoints"][1].update(core_groups=0, replicas=True)
    top = figures.expert_usage_figure(rep, 1).axes[0].child_axes[0]
    assert tick_labels(top) == ["g0 source", "g1 copy", "g2 copy", "g3 copy"]
    text = render_report(rep, [], Path("/r/out"))
    assert "groups [4, 4, 4, 4], replicas of the source's experts" in text
    assert "groups [4], core 1" in text  # reports without the key keep their labels


def test_expert_usage_large_bank_has_no_cell_values():
    fig = figures.expert_usage_figure(make_report(experts=64), 1)
    assert len(fig.axes[0].texts) == 0
    assert fig.get_size_inches()[0] <= 16
    assert texts_inside(fig) == []


def test_class_group_figure_panels_share_one_scale():
    rep = make_report()
    fig = figures.class_group_figure(rep, 1)
    panels = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in panels] == ["enc 2", "enc 3", "enc 4"]  # decoder layers see no classes: no panel
    assert {(a.images[0].norm.vmin, a.images[0].norm.vmax) for a in panels} == {(0.0, 1.0)}
    assert fig.get_suptitle() == "Class -> group routing: [1] s3/final"
    assert tick_labels(panels[0], "y") == CLASSES
    assert tick_labels(panels[0]) == ["g0 core", "g1 new", "g2 new", "g3 new"]
    assert panels[0].get_ylabel() == "class (majority of the patch)"
    assert all(a.get_xlabel() == "expert group" for a in panels)
    colourbars = [a for a in fig.axes if a.get_ylabel() == "share of the class's assignments"]
    assert len(colourbars) == 1
    np.testing.assert_allclose(panels[1].images[0].get_array(), rep["checkpoints"][1]["routing"][ENC[1]]["class_group_share"])
    assert len(panels[0].texts) == 16  # 4 classes x 4 groups, values in cells
    assert texts_inside(fig) == []


def test_class_group_figure_none_without_class_routing():
    rep = make_report()
    for v in rep["checkpoints"][0]["routing"].values():
        v["class_group_share"] = [[0.0]] * 4
    assert figures.class_group_figure(rep, 0) is None


def test_new_share_figure_bars_side_by_side():
    rep = make_report()
    fig = figures.new_share_figure(rep)
    weight_ax, token_ax = fig.axes
    assert fig.get_suptitle() == "Traffic to new expert groups per layer"
    assert weight_ax.get_title() == "by routing weight" and token_ax.get_title() == "by tokens (assignments)"
    assert tick_labels(token_ax) == ["enc 2", "enc 3", "enc 4", "dec 0", "dec 1"]  # encoder blocks first, by index
    assert token_ax.get_xlabel() == "MoE layer" and weight_ax.get_ylabel() == "new-group share"
    assert weight_ax.get_ylim() == token_ax.get_ylim()  # one y scale for both panels
    assert [t.get_text() for t in weight_ax.get_legend().get_texts()] == ["[0] source/final", "[1] s3/final"]
    src, grown = weight_ax.containers[0], weight_ax.containers[1]
    assert len(src) == 4 and len(grown) == 5  # the source has no block 4: no bar
    order = ENC + ["image_encoder.blocks.4.mlp"] + DEC
    np.testing.assert_allclose([b.get_height() for b in grown],
                               [rep["checkpoints"][1]["routing"][n]["new_weight_share"] for n in order])
    assert texts_inside(fig) == []


def test_class_metric_figure_bars_and_intervals():
    rep = make_report()
    fig = figures.class_metric_figure(rep)
    iou_ax, diff_ax = fig.axes
    assert iou_ax.get_ylabel() == "IoU" and diff_ax.get_ylabel() == "IoU difference"
    assert tick_labels(diff_ax) == CLASSES + ["mean (mIoU)"] and diff_ax.get_xlabel() == "class"
    assert diff_ax.get_title() == "difference to [0] with 95% paired bootstrap interval"
    heights = [b.get_height() for b in iou_ax.containers[1]]
    np.testing.assert_allclose(heights, [0.55, 0.6, 0.65, rep["checkpoints"][1]["metrics"]["miou"]])  # bare_soil undefined
    (bars,) = [c for c in diff_ax.containers if hasattr(c, "errorbar") and c.errorbar is not None]
    np.testing.assert_allclose([b.get_height() for b in bars], [0.05, 0.0, -0.05, 0.01])
    segments = bars.errorbar.lines[2][0].get_segments()
    np.testing.assert_allclose([(s[0][1], s[1][1]) for s in segments], [(-0.01, 0.09), (-0.03, 0.02), (-0.08, -0.02), (-0.02, 0.04)])
    assert texts_inside(fig) == []
    # one checkpoint: no comparison panel
    single = dict(rep, checkpoints=rep["checkpoints"][:1], comparisons=[])
    assert len(figures.class_metric_figure(single).axes) == 1


def test_long_checkpoint_paths_keep_titles_inside():
    long = "/data/" + "very-long-experiment-name-" * 6
    rep = make_report(paths=(long + "/source/final", long + "x" * 40 + "/final"))
    for _, _, fig in figures.eval_figures(rep):
        assert texts_inside(fig) == [], fig.get_suptitle()


@pytest.mark.parametrize("fmt", ["png", pytest.param("svg", marks=pytest.mark.slow), pytest.param("pdf", marks=pytest.mark.slow)])
def test_write_eval_figures_formats(tmp_path, fmt):
    out = tmp_path / "figs"
    with figures.output_dirs([(out, "--plots")], "eval") as outs:
        written = figures.write_eval_figures(make_report(), outs[out.resolve()], fmt)
    tmp_path = out
    assert [w.path.name for w in written] == [f"{s}.{fmt}" for s in ("class-metrics", "new-group-share", "expert-usage-ckpt0",
                                                                      "class-groups-ckpt0", "expert-usage-ckpt1", "class-groups-ckpt1")]
    # no temporaries left; the manifest records each figure
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([OWNER_FILE] + [w.path.name for w in written])
    assert set(json.loads((tmp_path / OWNER_FILE).read_text())["entries"]) == {w.path.name for w in written}
    head = written[0].path.read_bytes()[:200]
    if fmt == "png":
        # every figure's pixel size is its size in inches at 200 dpi
        for stem, _, fig in figures.eval_figures(make_report()):
            w, h = fig.get_size_inches() * 200
            assert_image(tmp_path / f"{stem}.png", (round(w), round(h)))
    elif fmt == "svg":
        assert b"<svg" in head
    else:
        assert head.startswith(b"%PDF")


def test_bad_format_and_taken_folder(tmp_path):
    with pytest.raises(SamoeError, match="--format"):
        figures.check_format("jpg")
    figures.check_output_dir(tmp_path / "new", False, "--plots")
    (tmp_path / "empty").mkdir()
    figures.check_output_dir(tmp_path / "empty", False, "--plots")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "a.png").write_text("x")
    with pytest.raises(SamoeError, match="taken.*--force"):
        figures.check_output_dir(tmp_path / "taken", False, "--plots")
    with pytest.raises(SamoeError, match="not written by samoe"):  # a user's folder, even with --force
        figures.check_output_dir(tmp_path / "taken", True, "--plots")
    with figures.output_dirs([(tmp_path / "ours", "--plots")], "eval") as outs:
        figures.save_figure(figures.new_figure(1, 1), outs[(tmp_path / "ours").resolve()], "a.png")
    with pytest.raises(SamoeError, match="--force"):
        figures.check_output_dir(tmp_path / "ours", False, "--plots")
    figures.check_output_dir(tmp_path / "ours", True, "--plots")  # samoe wrote it: --force may replace its figures
    with pytest.raises(SamoeError, match="overlaps"):
        figures.check_output_dir(tmp_path / "ours" / "sub", True, "--plots", {"--data": tmp_path / "ours"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(SamoeError, match="not a directory"):
        figures.check_output_dir(tmp_path / "file", True, "--plots")


# --------------------------------------------------------------------------- report


@pytest.mark.slow  # 4 s: matplotlib rendering
def test_report_markdown_tables_and_relative_links(tmp_path):
    rep = make_report()
    written = write_eval_outputs(rep, tmp_path / "plots", tmp_path / "report", "png")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| miou | 0.6500 | " in text and "+0.0100 (-0.0200, +0.0400)" in text
    assert "| vegetation | 0.7000 | 0.6500 | -0.0500 (-0.0800, -0.0200) |" in text
    assert "| bare_soil | 0.8000 | n/a | n/a |" in text
    assert "### [1] groups [4, 4, 4, 4], core 1" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links == [f"../plots/{Path(p).name}" for p in written["plots"]]
    assert all((tmp_path / "report" / link).is_file() for link in links)


@pytest.mark.slow  # 4 s: matplotlib rendering
def test_report_alone_renders_png_next_to_it(tmp_path):
    written = write_eval_outputs(make_report(), None, tmp_path, "pdf")
    text = Path(written["report"]).read_text()
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links and all(link.endswith(".png") and (tmp_path / link).is_file() for link in links)


def test_report_escapes_pipes(tmp_path):
    rep = make_report(paths=("/a|b/source/final", "/a|b/s3/final"))
    assert "`/a\\|b/source/final`" in render_report(rep, [], tmp_path)


# --------------------------------------------------------------------------- training curves

FIELDS = ("step", "epoch", "loss", "loss_sup", "loss_unsup", "seg", "sdf", "boundary", "aux", "lr", "alpha",
          "unsup_weight", "sigma_seg", "sigma_sdf", "sigma_boundary")
LAYERS = (ENC[0], DEC[0])


def make_run(d: Path, stage: int | None, steps: int, spe: int = 4, routing: bool = True, layers=LAYERS) -> Path:
    """A run directory as `samoe train` leaves it: metrics.csv per step, selector_log.csv per epoch, run.json."""
    d.mkdir(parents=True)
    fields = list(FIELDS)
    if routing:
        fields += [f"new_share:{n}" for n in layers] + [f"group_scale:{n}:{g}" for n in layers for g in (1, 2)]
    with open(d / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for s in range(1, steps + 1):
            t = s / steps
            row = dict(zip(FIELDS, (s, (s - 1) // spe, 2 - t, 1.5 - t, 0.3 * t, 1 - 0.5 * t, 0.4, 0.3, 0.01, 0.05 * (1 - t) + 1e-3,
                                    t, 0.5 * t, 0, 0, 0)))
            for i, n in enumerate(layers):
                row[f"new_share:{n}"] = 0.1 * (i + 1) * t
                for g in (1, 2):
                    row[f"group_scale:{n}:{g}"] = g * (i + 1) * t  # mean over groups 1, 2 = 1.5 (i + 1) t
            w.writerow([f"{row[k]:.8g}" for k in fields])
    with open(d / "selector_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "alpha", "unsup_weight", "selector_mean", "selector_std"])
        for e in range(1, steps // spe + 1):
            w.writerow([e, 0.5, 0.1, 0.5 + 0.01 * e, 0.1])
    if stage is not None:
        (d / "run.json").write_text(json.dumps({"identity": {"stage": stage}, "source_digest": "x", "command": []}))
    return d


@pytest.fixture
def three_stages(tmp_path) -> list[Path]:
    return [make_run(tmp_path / "s1", 1, 40), make_run(tmp_path / "s2", 2, 20), make_run(tmp_path / "s3", 3, 12)]


def _boundaries(ax) -> list[float]:
    return sorted({float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_linestyle() == "--"})


def test_runs_are_laid_end_to_end(three_stages):
    runs = [curves.load_run(p) for p in three_stages]
    assert [r.label() for r in runs] == ["s1 (stage 1)", "s2 (stage 2)", "s3 (stage 3)"]
    tl = curves.Timeline.of(runs)
    assert tl.offsets == [0.0, 40.0, 60.0]
    x, y = tl.series("loss")
    finite = np.isfinite(x)
    assert finite.sum() == 72 and x[finite][0] == 1 and x[finite][40] == 41 and x[finite][-1] == 72
    assert np.isnan(x[40]) and np.isnan(y[40])  # lines break between runs
    # selector rows of epoch e sit at the last step of loader epoch e - 1 (4 steps per epoch)
    sx, _ = tl.series("selector_mean", "selector")
    assert list(sx[np.isfinite(sx)][:3]) == [4, 8, 12] and sx[np.isfinite(sx)][10] == 44


def test_loss_and_schedule_figures(three_stages):
    tl = curves.Timeline.of([curves.load_run(p) for p in three_stages])
    fig = curves.loss_figure(tl)
    top, tasks = fig.axes
    assert fig.get_suptitle() == "Losses: s1 -> s2 -> s3"
    assert top.get_title() == "total, supervised and unsupervised loss" and tasks.get_title() == "loss per task"
    assert tasks.get_xlabel() == "training step (runs in the order given)" and top.get_ylabel() == "loss"
    assert [t.get_text() for t in tasks.get_legend().get_texts()] == ["segmentation", "signed distance", "boundary",
                                                                      "router balance (aux)"]
    assert _boundaries(top) == _boundaries(tasks) == [40.0, 60.0]
    (names,) = top.child_axes  # each run named over its stretch of the step axis
    assert tick_labels(names) == ["s1 (stage 1)", "s2 (stage 2)", "s3 (stage 3)"]
    assert list(names.get_xticks()) == [20.0, 50.0, 66.0]
    assert texts_inside(fig) == []
    fig = curves.schedule_figure(tl)
    lr, sel, weights = fig.axes
    assert lr.get_ylabel() == "learning rate" and weights.get_ylabel() == "selector weight"
    assert [t.get_text() for t in sel.get_legend().get_texts()] == ["selector alpha", "unsupervised weight"]
    assert texts_inside(fig) == []


def test_routing_figure_one_line_per_layer_and_group_scale_mean(three_stages):
    tl = curves.Timeline.of([curves.load_run(p) for p in three_stages])
    fig = curves.routing_figure(tl)
    share, scale = fig.axes
    assert share.get_ylabel() == "new-group share" and scale.get_ylabel() == "mean group scale"
    assert [t.get_text() for t in share.get_legend().get_texts()] == ["enc 2", "dec 0"]
    lines = [line for line in scale.get_lines() if line.get_linestyle() != "--"]
    x, y = lines[1].get_xdata(), lines[1].get_ydata()  # dec 0: groups 1, 2 scaled 2t, 4t -> mean 3t
    assert y[39] == pytest.approx(3.0) and x[39] == 40
    assert texts_inside(fig) == []


def test_routing_figure_absent_without_columns_and_colourbar_for_many_layers(tmp_path):
    plain = curves.Timeline.of([curves.load_run(make_run(tmp_path / "plain", None, 8, routing=False))])
    assert curves.routing_figure(plain) is None
    assert [stem for stem, _, _ in curves.curve_figures(plain.runs)] == ["losses", "schedules"]
    assert plain.runs[0].label() == "plain" and not curves.loss_figure(plain).axes[0].child_axes  # one run: no boundaries
    many = [f"image_encoder.blocks.{i}.mlp" for i in range(12)]
    tl = curves.Timeline.of([curves.load_run(make_run(tmp_path / "many", 1, 8, layers=many))])
    fig = curves.routing_figure(tl)
    assert all(ax.get_legend() is None for ax in fig.axes[:2])
    (bar,) = [a for a in fig.axes if a.get_ylabel().startswith("MoE layer")]
    assert tick_labels(bar, "y") == ["enc 0", "enc 11"]
    assert texts_inside(fig) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "metrics.csv").unlink(), "metrics.csv is missing"),
    (lambda d: (d / "metrics.csv").write_text(""), "is empty"),
    (lambda d: (d / "metrics.csv").write_text("step,loss\n"), "has no rows"),
    (lambda d: (d / "metrics.csv").write_text("loss\n1\n"), "no 'step' column"),
    (lambda d: (d / "metrics.csv").write_text("step,loss\n1,2\n2,abc\n"), "line 3 holds a value that is not a number"),
    (lambda d: (d / "metrics.csv").write_text("step,loss\n1,2,3\n"), "line 2 has 3 fields"),
    (lambda d: (d / "metrics.csv").write_text("step,loss\n1,2\n,3\n"), "row without a step number"),
    (lambda d: (d / "metrics.csv").write_bytes(b"step,loss\n1,\xff\n"), "not UTF-8"),
])
def test_damaged_run_is_one_user_error(tmp_path, damage, message):
    run = make_run(tmp_path / "r", 1, 8)
    damage(run)
    with pytest.raises(SamoeError, match=message):
        curves.load_run(run)


@pytest.mark.slow  # 6 s: every figure of three runs rendered
def test_cli_plot_writes_figures(three_stages, tmp_path):
    import cli

    out = tmp_path / "plots"
    result = CliRunner().invoke(cli.app, ["plot", *map(str, three_stages), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".samoe-owner.json", "losses.png", "routing.png", "schedules.png"]
    assert_image(out / "losses.png", (1800, 1300))
    assert_image(out / "schedules.png", (1800, 1700))
    assert_image(out / "routing.png", (1800, 1400))
    # the folder is now taken: refused without --force, untouched
    before = (out / "losses.png").read_bytes()
    result = CliRunner().invoke(cli.app, ["plot", str(three_stages[0]), "--out", str(out), "--format", "svg"])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0 and str(out) in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".samoe-owner.json", "losses.png", "routing.png", "schedules.png"]
    result = CliRunner().invoke(cli.app, ["plot", str(three_stages[0]), "--out", str(out), "--format", "svg", "--force", "--json"])
    assert result.exit_code == 0 and (out / "losses.svg").is_file() and (out / "losses.png").read_bytes() == before
    listed = json.loads(result.stdout)  # --json: the figures written, nothing else on stdout
    assert sorted(Path(f["path"]).name for f in listed) == ["losses.svg", "routing.svg", "schedules.svg"]
    assert all(Path(f["path"]).parent == out and f["caption"] for f in listed)
    # never into a run it reads, even a samoe-written one with --force
    result = CliRunner().invoke(cli.app, ["plot", str(three_stages[0]), "--out", str(three_stages[0] / "plots"), "--force"])
    assert result.exit_code == 2 and "overlaps" in result.stderr and not (three_stages[0] / "plots").exists()


@pytest.mark.parametrize("args", [["--format", "gif"], ["--run", "missing"]])
def test_cli_plot_bad_input(three_stages, tmp_path, args):
    import cli

    runs = [str(tmp_path / "missing")] if args[0] == "--run" else [str(three_stages[0])]
    fmt = args if args[0] == "--format" else []
    result = CliRunner().invoke(cli.app, ["plot", *runs, "--out", str(tmp_path / "o"), *fmt])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_plot_one_job_per_output(three_stages, tmp_path):
    import cli
    from upscale.ownership import exclusive, lock_paths

    out = tmp_path / "plots"
    with exclusive(out, "--out"):
        result = CliRunner().invoke(cli.app, ["plot", str(three_stages[0]), "--out", str(out)])
    assert result.exit_code == 2 and "in use by another samoe job" in result.stderr and not out.exists()
    result = CliRunner().invoke(cli.app, ["plot", str(three_stages[0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in lock_paths(out))  # the lock is gone after the job
