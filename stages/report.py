"""`samoe eval --report DIR`: the eval report as one Markdown file (`report.md`).

A user pastes it into a lab notebook or a pull request, so it is self-contained
text (metric table with the paired-bootstrap intervals, per-class IoU, routing
table) with the figures embedded by relative links, which keep working when the
folder is moved or committed as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from upscale.ownership import Owned

from .evaluate import METRICS, resolution_text
from .figures import Written, layer_label, layer_order

REPORT_NAME = "report.md"


def layout_label(ck: dict[str, Any]) -> str:
    """How a checkpoint's groups relate to its source, for routing tables."""
    if ck.get("replicas"):
        return "replicas of the source's experts"
    return f"core {ck['core_groups']}"


def _cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _num(v: Any, fmt: str = ".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("diff") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    interval = f" ({_num(lo, '+.4f')}, {_num(hi, '+.4f')})" if lo is not None and hi is not None else ""
    return f"{d['diff']:+.4f}{interval}"


def _flops(ck: dict[str, Any], base: dict[str, Any]) -> str:
    """Forward GFLOP per image and the ratio to the baseline (n/a in reports written before it was counted)."""
    flops, ref = ck.get("forward_flops"), base.get("forward_flops")
    if not flops:
        return "n/a"
    return f"{flops / 1e9:,.3f}" + (f" (x{flops / ref:.2f})" if ref else "")


def new_parts_rows(ck: dict[str, Any]) -> list[list[str]]:
    """Per metric: the grown checkpoint, the same with its new parts off, and grown minus off (95% CI)."""
    off = ck["new_parts_off"]
    return [[m, _num(ck["metrics"][m]), _num(off["metrics"][m]), _ci(off["diff"][m])] for m in METRICS]


NEW_PARTS_HEADER = ["metric", "as trained", "new parts off", "what they add (95% CI)"]


def new_parts_verdict(i: int, ck: dict[str, Any]) -> str:
    """One line a user reads first: does the new capacity do measurable work (mIoU, paired 95% CI)?"""
    off = ck["new_parts_off"]
    d = off["diff"]["miou"]
    lo, hi, diff = d.get("ci_low"), d.get("ci_high"), d.get("diff")
    head = f"[{i}] with its {off['parts']} switched off:"
    if diff is None or lo is None or hi is None:
        return f"{head} mIoU is undefined on this data (no class present)"
    added = f"mIoU {_num(off['metrics']['miou'])}; they add {diff:+.4f} ({lo:+.4f}, {hi:+.4f})"
    if lo > 0:
        return f"{head} {added}: the new capacity does measurable work"
    if hi < 0:
        return f"{head} {added}: the model scores higher without them"
    return (f"{head} {added}, an interval that includes 0: no measurable work from the new capacity on this data; "
            "any gain over its source came from training its old parts further")


def render_report(report: dict[str, Any], figures: list[Written], out: Path) -> str:
    """The Markdown text; figure links are relative to `out` (the folder holding report.md)."""
    cks, comps = report["checkpoints"], report["comparisons"]
    lines = ["# samoe eval report", "",
             f"Data: `{report['data']}`, {report['images']} images, {resolution_text(report)}; paired bootstrap over "
             f"images, {report['bootstrap']} resamples, seed {report['seed']}; intervals are 95%.", "",
             "## Checkpoints", ""]
    lines += _table(["", "path", "parameters", "forward GFLOP / image", "stages", "digest"],
                    [[f"[{i}]", f"`{ck['path']}`", f"{ck['total_params']:,}",
                      _flops(ck, cks[0]),
                      ck["stages"], f"`{ck['digest'][:19]}...`"]
                     for i, ck in enumerate(cks)], ["---", "---", "---:", "---:", "---", "---"])
    header = ["metric"] + [f"[{i}]" for i in range(len(cks))] + [f"[{i + 1}] - [0] (95% CI)" for i in range(len(comps))]
    lines += ["", "## Metrics", ""]
    lines += _table(header, [[m] + [_num(ck["metrics"][m]) for ck in cks] + [_ci(c["diff"][m]) for c in comps] for m in METRICS])
    ablated = [(i, ck) for i, ck in enumerate(cks) if "new_parts_off" in ck]
    if ablated:
        lines += ["", "## What the new parts add", "",
                  "Each grown checkpoint scored again with its new groups and extra blocks switched off, on the same "
                  "images; the difference is what the new capacity contributes (paired bootstrap over images).", ""]
        for i, ck in ablated:
            lines += [f"### [{i}]", "", new_parts_verdict(i, ck) + "."] + ([ck["regime"]["line"] + "."] if "regime" in ck else [])
            lines += [""] + _table(NEW_PARTS_HEADER, new_parts_rows(ck))
    lines += ["", "## IoU per class", ""]
    lines += _table(["class"] + header[1:],
                    [[cls] + [_num(ck["metrics"]["iou"].get(cls)) for ck in cks]
                     + [_ci(c.get("class_diff", {}).get(cls)) for c in comps] for cls in report["classes"]])
    lines += ["", "## Routing", "",
              "Share of assignments per group, traffic to new groups by tokens and by routing weight, "
              "dead experts, load imbalance (coefficient of variation) and mean router entropy.", ""]
    for i, ck in enumerate(cks):
        lines += [f"### [{i}] groups {ck['groups']}, {layout_label(ck)}", ""]
        rows = [[layer_label(name), " ".join(f"{x:.2f}" for x in v["group_share"]), f"{v['new_share']:.3f}",
                 f"{v['new_weight_share']:.3f}", v["dead_experts"], f"{v['load_cv']:.2f}", f"{v['router_entropy']:.3f}"]
                for name, v in sorted(ck["routing"].items(), key=lambda kv: layer_order(kv[0]))]
        lines += _table(["layer", "group share", "new (tokens)", "new (weight)", "dead", "load CV", "entropy"], rows) + [""]
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            link = Path(os.path.relpath(f.path, out)).as_posix()
            if f.path.suffix == ".pdf":
                lines += [f"- [{f.caption}]({link})", ""]
            else:
                lines += [f"**{f.caption}**", "", f"![{f.caption}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], figures: list[Written], out: Owned) -> Path:
    """Write report.md into output folder `out`: recorded first, then atomically."""
    out.record(REPORT_NAME)
    out.dir.write_bytes(REPORT_NAME, render_report(report, figures, out.dir.path).encode("utf-8"), out.token)
    return out.dir.path / REPORT_NAME


def write_eval_outputs(report: dict[str, Any], plots: Path | None, report_dir: Path | None,
                       fmt: str = "png", force: bool = False) -> dict[str, Any]:
    """Figures into `plots` and/or report.md into `report_dir`; returns what was written, for the JSON report.

    The report embeds the `--plots` figures when they are PNG or SVG (linked relatively);
    otherwise (no `--plots`, or PDF which Markdown cannot show) it renders PNGs next to report.md.
    """
    from .figures import output_dirs, write_eval_figures

    written: dict[str, Any] = {}
    figures: list[Written] = []
    outputs = [(d, option) for d, option in ((plots, "--plots"), (report_dir, "--report")) if d is not None]
    with output_dirs(outputs, "eval", force) as outs:
        if plots is not None:
            figures = write_eval_figures(report, outs[plots.resolve()], fmt)
            written["plots"] = [str(f.path) for f in figures]
        if report_dir is not None:
            target = outs[report_dir.resolve()]
            if plots is None or fmt == "pdf":
                figures = write_eval_figures(report, target, "png")
            written["report"] = str(write_report(report, figures, target))
    return written
