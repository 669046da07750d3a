"""The `samoe` command line: one thin function per subcommand, parsing and printing only.

Every command reports bad input as one line on stderr with exit code 2, internal
failures with exit code 1 (the traceback only with `samoe --debug ...`).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Grow a SAM-based MoE segmentation model for SAR (1.5B -> 10B) and train it in stages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
_state = {"debug": False}


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(code)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SamoeError -> one line + exit 2; anything else -> one line + exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from upscale.errors import SamoeError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SamoeError as e:
            if _state["debug"]:
                raise
            _fail(str(e), 2)
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written", 130)
        except Exception as e:  # internal failure: still one line unless --debug
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (re-run with `samoe --debug ...` for the traceback)", 1)

    return wrapper


def _command_line() -> list[str]:
    return ["samoe", *sys.argv[1:]]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _not_built(name: str, issue: int) -> None:
    _fail(f"`samoe {name}` is not built yet (tracked in issue {issue})", 2)


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    from upscale.errors import SamoeError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SamoeError(f"{option} {text!r} is not a comma-separated list of integers, e.g. 15,16,17") from None


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures.")) -> None:
    _state["debug"] = debug


# --------------------------------------------------------------------------- init


@app.command()
@handles_errors
def init(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create."),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny | sam-moe-1.5b"),
    from_sam: Optional[Path] = typer.Option(None, "--from-sam", help="Dense SAM .pth to upcycle (vit_b/l/h)."),
    experts: int = typer.Option(16, "--experts", help="Experts per MoE layer (with --from-sam)."),
    moe_blocks: Optional[str] = typer.Option(None, "--moe-blocks", help="Encoder blocks that get MoE, e.g. 3,4,5 (default: the last 9)."),
    top_k: int = typer.Option(2, "--top-k", help="Experts per token (with --from-sam)."),
    num_classes: int = typer.Option(4, "--num-classes", help="Segmentation classes (with --from-sam)."),
    decoder_moe: bool = typer.Option(True, "--decoder-moe/--no-decoder-moe", help="MoE in the decoder MLPs (with --from-sam)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the checkpoint summary as JSON."),
) -> None:
    """Create the source SamMoE checkpoint: from a preset, or upcycled from a dense SAM .pth."""
    from upscale.checkpoint import Checkpoint, parse_dtype
    from upscale.config import get_preset
    from upscale.create import init_from_preset, init_from_sam
    from upscale.errors import SamoeError

    if (preset is None) == (from_sam is None):
        raise SamoeError("give exactly one of --preset NAME or --from-sam FILE.pth")
    torch_dtype = parse_dtype(dtype)
    with console.status("building and writing the checkpoint...", spinner="dots"):
        if preset is not None:
            path = init_from_preset(get_preset(preset), out, seed, torch_dtype, _command_line(), force)
        else:
            blocks = _parse_ints(moe_blocks, "--moe-blocks") if moe_blocks else None
            if blocks is None:
                from upscale.create import detect_vit, load_sam_state
                from upscale.config import SAM_VITS

                depth = SAM_VITS[detect_vit(load_sam_state(from_sam))]["depth"]
                blocks = tuple(range(max(0, depth - 9), depth))
            path = init_from_sam(from_sam, out, experts, blocks, top_k, num_classes, decoder_moe, seed,
                                 torch_dtype, _command_line(), force)
    _show_summary(Checkpoint.open(path), as_json)


# --------------------------------------------------------------------------- inspect


def _show_summary(ckpt: Any, as_json: bool, verify: bool = False) -> None:
    from upscale.summary import inspect_checkpoint

    report = inspect_checkpoint(ckpt)
    if verify:
        report["verify"] = _verify(ckpt)
    if as_json:
        _print_json(report)
        return
    console.print(f"[bold]{report['path']}[/]  {report['digest'][:19]}…  dtype {report['dtype']}")
    t = Table(title="parameters")
    t.add_column("component")
    t.add_column("params", justify="right")
    for comp, n in report["params_by_component"].items():
        t.add_row(comp, f"{n:,}")
    t.add_row("[bold]total[/]", f"[bold]{report['total_params']:,}[/] ({report['total_params'] / 1e9:.3f}B)")
    console.print(t)
    p = Table(title="provenance")
    p.add_column("kind")
    p.add_column("params", justify="right")
    for kind, n in report["params_by_provenance"].items():
        p.add_row(kind, f"{n:,}")
    console.print(p)
    layers = report["experts_per_layer"]
    if layers:
        groups = next(iter(report["groups"].values()))
        console.print(
            f"MoE: {len(layers)} layers x {next(iter(layers.values()))} experts in {len(groups)} groups {groups} "
            f"(core groups {report['core_groups']}, top-k {report['top_k']}, top-k groups {report['top_k_groups']})"
        )
    console.print(f"encoder blocks: {report['num_blocks']} ({report['extra_blocks']} extra)")
    console.print(f"shards: {len(report['shards'])}, {sum(s['bytes'] for s in report['shards']):,} bytes")
    for i, entry in enumerate(report["lineage"]):
        parent = f" <- {entry['parent']} ({(entry['parent_digest'] or '')[:19]}…)" if entry.get("parent") else ""
        console.print(f"lineage {i}: {entry['command']} (seed {entry['seed']}, samoe {entry['version']}){parent}", soft_wrap=True)
    if report["stages"]:
        for s in report["stages"]:
            console.print(f"stage {s.get('stage')}: {json.dumps(s)}", soft_wrap=True)
    else:
        console.print("stages: none yet")
    if verify:
        v = report["verify"]
        console.print(f"verify: {'[green]ok[/]' if v['ok'] else '[red]FAILED[/]'} {v['message']}")
        if not v["ok"]:
            raise typer.Exit(2)


def _verify(ckpt: Any) -> dict[str, Any]:
    bad = ckpt.verify_digests()
    if bad:
        return {"ok": False, "message": f"digest mismatch in {', '.join(bad)}: the file is corrupt; restore it or re-create the checkpoint"}
    ckpt.check_matches_config()
    return {"ok": True, "message": f"{len(ckpt.files)} shard digests match, tensors match the config"}


@app.command("inspect-checkpoint")
@handles_errors
def inspect_checkpoint(
    path: Path = typer.Argument(..., help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verify: bool = typer.Option(False, "--verify", help="Recompute shard digests (reads all data)."),
) -> None:
    """Show what is inside a checkpoint (headers and samoe.json only, unless --verify)."""
    from upscale.checkpoint import Checkpoint

    ckpt = Checkpoint.open(path)
    _show_summary(ckpt, as_json, verify)
    if verify and as_json and not _verify(ckpt)["ok"]:
        raise typer.Exit(2)


# --------------------------------------------------------------------------- not built yet


@app.command("demo-data")
@handles_errors
def demo_data(
    out: Path = typer.Option(..., "--out", help="Directory to create (A/, A-test/, B/)."),
    labelled: int = typer.Option(24, "--labelled"),
    unlabelled: int = typer.Option(48, "--unlabelled"),
    test: int = typer.Option(12, "--test"),
    size: int = typer.Option(128, "--size"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write synthetic speckled SAR scenes: A/ (labelled), A-test/ (held out), B/ (unlabelled)."""
    from stages.data import make_demo_data
    from upscale.errors import SamoeError

    if min(labelled, test, unlabelled) < 0 or size < 16:
        raise SamoeError("--labelled/--unlabelled/--test must be >= 0 and --size >= 16")
    if out.exists() and not force:
        raise SamoeError(f"{out} already exists: choose another --out or pass --force to replace it")
    with console.status("writing demo data...", spinner="dots"):
        summary = make_demo_data(out, labelled=labelled, unlabelled=unlabelled, test=test, size=size, seed=seed, force=force)
    if as_json:
        _print_json(summary)
    else:
        console.print(f"demo data in {out}: {json.dumps(summary, default=str)}", soft_wrap=True)


@app.command()
def plan() -> None:
    """Parameter counts and memory of a grown model, without writing (issue 5)."""
    _not_built("plan", 5)


@app.command()
def expand() -> None:
    """Grow a checkpoint: more experts in groups, extra blocks (issue 5)."""
    _not_built("expand", 5)


@app.command()
def train() -> None:
    """Train stage 1/2/3 as a resumable job (issue 6)."""
    _not_built("train", 6)


@app.command("pseudo-label")
def pseudo_label() -> None:
    """Label an unlabelled folder with a teacher checkpoint (issue 7)."""
    _not_built("pseudo-label", 7)


@app.command("eval")
def evaluate() -> None:
    """Compare checkpoints on a labelled folder, with routing statistics (issue 8)."""
    _not_built("eval", 8)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
