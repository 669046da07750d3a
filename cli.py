"""The `samoe` command line: one thin function per subcommand, parsing and printing only.

Every command reports bad input as one line on stderr with exit code 2, internal
failures with exit code 1 (the traceback only with `samoe --debug ...`). The line
stays one line: control characters in it are escaped, warnings that third-party
libraries emit during a failed command are dropped (after a successful one they
follow as `warning:` lines), and paths are printed without rich markup.
SIGTERM stops a command the way Ctrl-C does: its clean-up runs (exit 143).
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from stages.engine import TrainConfig


class _OneLineErrors(typer.core.TyperGroup):
    """Bad option values (parsed by typer) are one `error:` line and exit 2, like every other bad input."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
        from typer.exceptions import Abort

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rc = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:  # bare `samoe`: the help text, as before
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if isinstance(e, UsageError) and e.ctx is not None else ""
            sys.stderr.write(f"error: {e.format_message()}{hint}\n")
            sys.exit(e.exit_code)
        except Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        sys.exit(rc if isinstance(rc, int) else 0)


_option_type = typer.core.TyperOption.display_type_rich


def _flag_type(self: typer.core.TyperOption, ctx: Any) -> Optional[str]:
    """Flags take no value, so --help shows no type beside them (typer shows "<bool>")."""
    return None if self.is_flag else _option_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]

app = typer.Typer(
    cls=_OneLineErrors,
    help="Grow a SAM-based MoE segmentation model for SAR (1.5B -> 10B) and train it in stages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
_state = {"debug": False}


_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """`text` with control characters escaped (a newline in a file name must not break the one line)."""
    return str(text).translate(_CONTROL)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every command's clean-up runs."""

    signum = signal.SIGTERM


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


# Environment variables samoe reads, and what each must hold (checked before any command runs).
_ENV_CHECKS: dict[str, tuple[Callable[[str], bool], str]] = {
    "SAMOE_DEVICE": (lambda v: v in ("", "cpu", "cuda"), "cpu or cuda"),
    "SAMOE_MAX_IMAGE_PIXELS": (lambda v: v.isdigit() and 0 < int(v) < 2**62, "a positive whole number of pixels"),
    "SAMOE_LAUNCH_COMMAND": (lambda v: v == "" or _string_list(v), "the JSON list of arguments `samoe train --nproc` sets"),
}


def _string_list(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_environment() -> None:
    """Every SAMOE_* variable samoe reads holds a value it understands (else one line, exit 2)."""
    import os

    from upscale.errors import SamoeError

    for name, (ok, what) in _ENV_CHECKS.items():
        value = os.environ.get(name)
        if value is not None and not ok(value):
            raise SamoeError(f"{name}={value[:60]!r} is not valid: it must be {what}; fix or unset it")


@contextmanager
def _held_warnings() -> Any:
    """Hold the warnings and log records third-party libraries emit during a command.

    Yields a list that the caller empties when the command failed (its one error line is then all
    stderr shows); whatever is left is printed afterwards as `warning:` lines."""
    import logging
    import warnings

    held: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(f"{record.name}: {record.getMessage()}")

    handler = Hold(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield held
            held += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        root.removeHandler(handler)
        for line in dict.fromkeys(held):
            sys.stderr.write(f"warning: {one_line(line)[:300]}\n")


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """SamoeError -> one line + exit 2; anything else -> one line + exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _held_warnings() as held:
            try:
                return _run_command(fn, args, kwargs)
            except BaseException:
                held.clear()  # a failure is one line: what libraries logged on the way is not shown
                raise

    return wrapper


def _run_command(fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Run one command, turning each kind of failure into its one line and exit code."""
    from upscale.errors import SamoeError

    try:
        check_environment()
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except SamoeError as e:
        if _state["debug"]:
            raise
        left = getattr(e, "samoe_left", None)
        _fail(f"{e}; {left}" if left else str(e), 2)
    except KeyboardInterrupt as e:
        _fail(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}; {_left(e)}",
              128 + getattr(e, "signum", signal.SIGINT))
    except OSError as e:  # full disk, read-only or vanished paths: the user's environment, not a bug
        if _state["debug"]:
            raise
        where = f" ({e.filename})" if e.filename else ""
        code, reason = e.errno, e.strerror or str(e)
        if code is None and "requested and" in str(e) and "written" in str(e):  # numpy/tifffile's short write
            code, reason = errno.ENOSPC, f"No space left on device (a write was cut short: {e})"
        hint = {errno.ENOSPC: "free space or choose another output directory",
                errno.EROFS: "the file system is read-only; choose another output directory",
                errno.EACCES: "check permissions or choose another output directory"}.get(code, "check the path and try again")
        _fail(f"{reason}{where}: {hint}; {_left(e)}", 2)
    except Exception as e:  # internal failure: still one line unless --debug
        if _state["debug"]:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (re-run with `samoe --debug ...` for the traceback)", 1)


def _left(e: BaseException) -> str:
    """What a failed command left behind: set by commands that keep partial work (e.g. pseudo-label)."""
    return getattr(e, "samoe_left", None) or "nothing was written"


SEED_MAX = 2**32 - 1  # seeds are mixed into 64-bit generator seeds (e.g. seed * 1_000_003 + epoch)


def _finite(value: Optional[float]) -> Optional[float]:
    """typer callback for float options: ranges alone let NaN through (every comparison with NaN is false)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _positive(value: Optional[float]) -> Optional[float]:
    """typer callback for float options that must be > 0 (typer's min is inclusive)."""
    if value is not None and not _finite(value) > 0:
        raise typer.BadParameter(f"{value} must be > 0")
    return value


def _one_job(path: Path, option: str = "--out") -> Any:
    """The exclusive lock of an output while a command writes it (a second job fails at once)."""
    from upscale.ownership import exclusive

    return exclusive(path, option)


@contextmanager
def _collector_off() -> Iterator[None]:
    """Import torch with the cyclic garbage collector off: its ~10^6 import-time objects set off repeated
    full collections that find nothing. They are frozen afterwards, so later collections skip them too."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _command_line() -> list[str]:
    return ["samoe", *sys.argv[1:]]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


_DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: CUDA when a GPU is visible, else CPU)."
_COMPILE_HELP = ("Compile each transformer block and the output heads with torch.compile (in place: checkpoints are "
                 "the same; first steps pay the compile, about a minute on a CPU; see docs/compile.md).")
_PRECISION_HELP = ("fp32 | bf16. bf16: autocast on one device (CUDA, or CPU bf16 kernels) with fp32 weights and "
                   "optimizer state; FSDP2 mixed precision (bf16 compute, fp32 gradient reduction) under --nproc/torchrun.")


_SCALE_HELP = ("What the pixel values are: linear (sigma0 power) | db | amplitude | dn (calibrated digital numbers, "
               "with --dn-calibration) | display (8/16-bit quick-looks). Default: the folder's data.json, else the "
               "checkpoint's record, else linear. Values that contradict it are refused.")
_CAL_HELP = "With --input-scale dn: A in sigma0 = (DN / A)^2 (the product's calibration constant)."
_POL_HELP = "Band names in order, e.g. VV,VH or HH (default: data.json's); scenes with another band count are refused."
_OVERLAP_HELP = "Sliding windows: the fraction of a window its neighbour covers (default 0.25); outputs are blended."
_STRIDE_HELP = "Sliding windows: pixels between window starts (instead of --overlap)."


def _scale_option() -> Any:
    return typer.Option(None, "--input-scale", help=_SCALE_HELP)


def _cal_option() -> Any:
    return typer.Option(None, "--dn-calibration", callback=_positive, help=_CAL_HELP)


def _pol_option() -> Any:
    return typer.Option(None, "--polarisations", help=_POL_HELP)


def _overlap_option() -> Any:
    return typer.Option(None, "--overlap", min=0, max=0.99, callback=_finite, help=_OVERLAP_HELP)


def _stride_option() -> Any:
    return typer.Option(None, "--stride", min=1, help=_STRIDE_HELP)


def _unit_options(input_scale: Optional[str], dn_calibration: Optional[float], polarisations: Optional[str]) -> Any:
    """The command line's statement about units (stages/units.py), checked."""
    from stages.units import SCALES, UnitOptions, parse_polarisations
    from upscale.errors import SamoeError

    if input_scale is not None and input_scale not in SCALES:
        raise SamoeError(f"--input-scale {input_scale!r} is not one of {', '.join(SCALES)}")
    return UnitOptions(input_scale, dn_calibration, parse_polarisations(polarisations))


def _precision(precision: Optional[str]) -> str:
    """--precision, checked (default fp32)."""
    from upscale.device import check_precision

    return check_precision(precision or "fp32")


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    from upscale.errors import SamoeError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SamoeError(f"{option} {text!r} is not a comma-separated list of integers, e.g. 15,16,17") from None


def _image_memory(value: Optional[str]) -> Optional[int]:
    """typer callback for --image-memory: a size such as 1G, checked here so a bad one is a usage error."""
    if value is None:
        return None
    from stages.rasters import parse_bytes
    from upscale.errors import SamoeError

    try:
        return parse_bytes(value, "--image-memory")
    except SamoeError as e:
        raise typer.BadParameter(str(e).removeprefix("--image-memory ")) from None


def _version(value: bool) -> None:
    if value:
        from upscale import __version__

        console.print(f"samoe {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
          image_memory: Optional[str] = typer.Option(None, "--image-memory", callback=_image_memory,
                                                     help="Memory one image's decoded pixels and working arrays may take, "
                                                          "e.g. 512M or 4G (default 1G, or SAMOE_IMAGE_MEMORY). Larger "
                                                          "scenes are read by windows, or refused before decoding.")) -> None:
    _state["debug"] = debug
    if image_memory is not None or "stages.rasters" in sys.modules:  # None resets an earlier in-process call's
        from stages.rasters import set_image_memory

        set_image_memory(image_memory)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- init


@app.command()
@handles_errors
def init(
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to create."),
    preset: Optional[str] = typer.Option(None, "--preset", help="tiny | sam-moe-1.5b"),
    from_sam: Optional[Path] = typer.Option(None, "--from-sam", help="Dense SAM .pth to upcycle (vit_b/l/h)."),
    experts: int = typer.Option(16, "--experts", min=1, help="Experts per MoE layer (with --from-sam)."),
    moe_blocks: Optional[str] = typer.Option(None, "--moe-blocks", help="Encoder blocks that get MoE, e.g. 3,4,5 (default: the last 9)."),
    top_k: int = typer.Option(2, "--top-k", min=1, help="Experts per token (with --from-sam)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", min=1,
                                              help="Segmentation classes (default: the preset's; 4 with --from-sam)."),
    decoder_moe: bool = typer.Option(True, "--decoder-moe/--no-decoder-moe", help="MoE in the decoder MLPs (with --from-sam)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the checkpoint summary as JSON."),
) -> None:
    """Create the source SamMoE checkpoint: from a preset, or upcycled from a dense SAM .pth."""
    from upscale.checkpoint import Checkpoint, check_dtype
    from upscale.config import check_sam_file, get_preset
    from upscale.errors import SamoeError
    from upscale.ownership import check_separate, preflight_new_output

    # every check that needs no torch first: a mistyped option is answered at once, not after 3 s of imports
    if (preset is None) == (from_sam is None):
        raise SamoeError("give exactly one of --preset NAME or --from-sam FILE.pth")
    check_dtype(dtype)
    cfg = get_preset(preset) if preset is not None else None
    blocks = _parse_ints(moe_blocks, "--moe-blocks") if moe_blocks else None
    if from_sam is not None:
        check_sam_file(from_sam)
    check_separate(out, "--out", {"--from-sam": from_sam})  # --force must never delete the .pth it reads
    preflight_new_output(out, force)

    from upscale.checkpoint import parse_dtype
    from upscale.create import init_from_preset, init_from_sam

    torch_dtype = parse_dtype(dtype)
    with _one_job(out), console.status("building and writing the checkpoint...", spinner="dots"):
        if cfg is not None:
            if num_classes is not None:
                from dataclasses import replace

                cfg = replace(cfg, num_classes=num_classes).validate()
            path = init_from_preset(cfg, out, seed, torch_dtype, _command_line(), force)
        else:
            from upscale.create import detect_vit, load_sam_state
            from upscale.config import SAM_VITS

            sam = load_sam_state(from_sam)  # read once: the checks and the weights come from the same bytes
            if blocks is None:
                depth = SAM_VITS[detect_vit(sam)]["depth"]
                blocks = tuple(range(max(0, depth - 9), depth))
            path = init_from_sam(from_sam, out, experts, blocks, top_k, num_classes or 4, decoder_moe, seed,
                                 torch_dtype, _command_line(), force, sam=sam)
    _show_summary(Checkpoint.open(path), as_json)


# --------------------------------------------------------------------------- inspect


def _show_summary(ckpt: Any, as_json: bool, verify: bool = False) -> None:
    from upscale.summary import inspect_checkpoint

    from stages.dataspec import recorded

    report = inspect_checkpoint(ckpt)
    spec = recorded(ckpt.meta, str(ckpt.path / "samoe.json"))
    report["data"] = spec.to_record() if spec is not None else None
    if verify:
        report["verify"] = _verify(ckpt)
    if as_json:
        _print_json(report)
        if verify and not report["verify"]["ok"]:
            _fail(report["verify"]["message"], 2)
        return
    console.print(f"[bold]{escape(report['path'])}[/]  {report['digest'][:19]}…  dtype {report['dtype']}")
    console.print(_params_table("parameters", report["params_by_component"],
                                f"[bold]{report['total_params']:,}[/] ({report['total_params'] / 1e9:.3f}B)"))
    p = Table(title="provenance")
    p.add_column("kind")
    p.add_column("params", justify="right")
    for kind, n in report["params_by_provenance"].items():
        p.add_row(kind, f"{n:,}")
    console.print(p)
    layers = report["experts_per_layer"]
    if layers:
        groups = next(iter(report["groups"].values()))
        console.print(f"MoE: {len(layers)} layers x {next(iter(layers.values()))} experts in {len(groups)} groups {groups} "
                      f"({_routing_summary(report, len(groups) > report['core_groups'])})")
    console.print(f"encoder blocks: {report['num_blocks']} ({report['extra_blocks']} extra)")
    console.print(f"shards: {len(report['shards'])}, {sum(s['bytes'] for s in report['shards']):,} bytes")
    for i, entry in enumerate(report["lineage"]):
        parent = f" <- {entry['parent']} ({(entry['parent_digest'] or '')[:19]}…)" if entry.get("parent") else ""
        console.print(f"lineage {i}: {entry['command']} (seed {entry['seed']}, samoe {entry['version']}){parent}", soft_wrap=True,
                      markup=False)
        if isinstance(entry.get("recipe"), dict):
            settings = " ".join(f"{k}={json.dumps(v)}" for k, v in entry["recipe"].items())
            console.print(one_line(f"  recipe: {settings}"), soft_wrap=True, markup=False)
    if spec is not None:
        names = ", ".join(spec.classes.names) if spec.classes is not None else "not named"
        console.print(escape(f"data: {spec.units.describe()}; classes: {names}; scenes "
                             f"{'resized to the model' if spec.resize else 'as windows'}"), soft_wrap=True)
    if report["stages"]:
        for s in report["stages"]:
            console.print(f"stage {s.get('stage')}: {json.dumps(s)}", soft_wrap=True, markup=False)
    else:
        console.print("stages: none yet")
    if verify:
        v = report["verify"]
        if not v["ok"]:
            _fail(v["message"], 2)
        console.print(f"verify: [green]ok[/] {escape(v['message'])}")


def _verify(ckpt: Any) -> dict[str, Any]:
    bad = ckpt.verify_digests()
    if bad:
        return {"ok": False, "message": f"digest mismatch in {', '.join(bad)}: the file is corrupt; restore it or re-create the checkpoint"}
    ckpt.check_matches_config()
    nonfinite = ckpt.nonfinite_tensors()
    if nonfinite:
        return {"ok": False, "message": f"{len(nonfinite)} tensor(s) contain NaN or Inf, e.g. {nonfinite[0]}: the weights are damaged; use an earlier checkpoint"}
    return {"ok": True, "message": f"{len(ckpt.files)} shard digests match, tensors match the config, all values finite"}


@app.command("inspect-checkpoint")
@handles_errors
def inspect_checkpoint(
    path: Path = typer.Argument(..., help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verify: bool = typer.Option(False, "--verify", help="Recompute shard digests (reads all data)."),
) -> None:
    """Show what is inside a checkpoint (headers and samoe.json only, unless --verify)."""
    from upscale.checkpoint import Checkpoint

    _show_summary(Checkpoint.open(path), as_json, verify)


# --------------------------------------------------------------------------- data, growth, training, evaluation


@app.command("demo-data")
@handles_errors
def demo_data(
    out: Path = typer.Option(..., "--out", help="Directory to create (A/, A-test/, B/)."),
    labelled: int = typer.Option(24, "--labelled-scenes", min=0, help="Labelled scenes in A/."),
    unlabelled: int = typer.Option(48, "--unlabelled-scenes", min=0, help="Unlabelled scenes in B/."),
    test: int = typer.Option(12, "--test-scenes", min=0, help="Held-out labelled scenes in A-test/."),
    size: int = typer.Option(128, "--size", min=16, max=8192),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX),
    preset: str = typer.Option("easy", "--preset", help="easy: 4 classes far apart | hard: 10 classes told apart "
                                                        "by polarimetric ratio, texture, rows and context | codebook: 16 "
                                                        "classes, each a set of parcel signatures (knowledge-bound)."),
    signatures: Optional[int] = typer.Option(None, "--signatures", min=1, help="codebook only: signature -> class facts "
                                             "the scenes draw from (default: fine 2200, coarse 960; more facts need "
                                             "more capacity)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="codebook only: fine (default; clean 0.25 dB steps, "
                                       "2233 signatures) | coarse (1 dB steps, looks and texture vary, 960)."),
    regions: int = typer.Option(1, "--regions", min=1, max=64, help="hard only: scenes from this many regions, each with "
                                "its own class signatures and sensor noise floor (knowledge a larger model must hold)."),
    region: Optional[int] = typer.Option(None, "--region", min=0, help="hard only: every scene from this region "
                                         "(0..regions-1), for a per-region test set."),
    force: bool = typer.Option(False, "--force"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write synthetic speckled SAR scenes: A/ (labelled), A-test/ (held out), B/ (unlabelled)."""
    from stages.data import make_demo_data

    with _one_job(out), console.status("writing demo data...", spinner="dots"):
        summary = make_demo_data(out, labelled=labelled, unlabelled=unlabelled, test=test, size=size, seed=seed, force=force,
                                 preset=preset, regions=regions, region=region, signatures=signatures, grid=grid)
    if as_json:
        _print_json(summary)
    else:
        console.print(f"demo data in {out}: {json.dumps(summary, default=str)}", soft_wrap=True, markup=False)


def _params_table(title: str, by_component: dict[str, int], total: str) -> Table:
    """Parameters per component and their total (inspect-checkpoint and plan)."""
    t = Table(title=title)
    t.add_column("component")
    t.add_column("params", justify="right")
    for comp, n in by_component.items():
        t.add_row(comp, f"{n:,}")
    t.add_row("[bold]total[/]", total)
    return t


def _routing_summary(report: dict[str, Any], routed: bool) -> str:
    """The routing options of a checkpoint summary, in words; the new groups' options only where there are some."""
    parts = [f"core groups {report['core_groups']}", f"top-k {report['top_k']}", f"top-k groups {report['top_k_groups']}"]
    if routed:
        parts.append(f"top-k in a new group {report['routed_top_k']}")
        if report.get("replicas"):
            parts.append("groups are replicas of the source's experts")
    return ", ".join(parts)


_RECIPE_HELP = "TOML recipe (recipes/10b.toml): the growth plan and each stage's settings."
_SET_HELP = "Override one recipe key, e.g. --set lr=0.01 or --set train.stage2.last_k=2 (repeatable)."


def _recipe_option() -> Any:
    return typer.Option(None, "--recipe", help=_RECIPE_HELP)


def _set_option() -> Any:
    return typer.Option([], "--set", metavar="KEY=VALUE", help=_SET_HELP)


def _growth_settings(recipe_path: Optional[Path], overrides: list[str], **given: Any) -> tuple[Any, dict[str, Any]]:
    """The GrowthRecipe of [growth], --set and the options given on the command line (not None), and the recipe read."""
    from upscale.growth import GrowthRecipe
    from upscale.recipe import load_recipe, resolve, unknown_tables

    recipe = load_recipe(recipe_path, overrides, "growth")
    unknown_tables(recipe, ("growth", "train"), str(recipe_path or "--set"))
    values = resolve(recipe, ("growth",), GrowthRecipe, str(recipe_path or "--set"))
    values.update({k: v for k, v in given.items() if v is not None})
    return GrowthRecipe(**values), recipe


_EXPERTS_HELP = "Experts per MoE layer after growth (e.g. 117); over the recipe's."
_GROUPS_HELP = "Number of groups (e.g. 8) or sizes, core group(s) first (e.g. 16,15,15,15,14,14,14,14); over the recipe's."
_EXTRA_HELP = "Blocks appended after the last ViT block (start as the identity); over the recipe's."


@app.command()
@handles_errors
def plan(
    source: Optional[Path] = typer.Argument(None, help="Source checkpoint (or use --preset)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Plan from a preset instead of a checkpoint."),
    recipe: Optional[Path] = _recipe_option(),
    overrides: list[str] = _set_option(),
    experts: Optional[int] = typer.Option(None, "--experts", min=1, help=_EXPERTS_HELP),
    groups: Optional[str] = typer.Option(None, "--groups", help=_GROUPS_HELP),
    extra_blocks: Optional[int] = typer.Option(None, "--extra-blocks", min=0, help=_EXTRA_HELP),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Training dtype for the memory estimate."),
    last_k: Optional[int] = typer.Option(None, "--last-k", min=0, help="Stage 2 unfreezes the FFN/MoE of the last K ViT "
                                         "blocks (default: the recipe's train.stage2.last_k, else 4)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Parameter counts, per-stage memory and forward FLOPs of a grown model, from its config; writes nothing."""
    from upscale.checkpoint import Checkpoint, check_dtype
    from upscale.config import get_preset
    from upscale.errors import SamoeError
    from stages.plan import plan_report

    if (source is None) == (preset is None):
        raise SamoeError("give exactly one of a SOURCE checkpoint or --preset NAME")
    settings, table = _growth_settings(recipe, overrides, experts=experts, groups=groups, extra_blocks=extra_blocks)
    src_cfg = get_preset(preset) if preset else Checkpoint.open(source).config
    spec = settings.spec(src_cfg.moe.num_experts, 0)
    if last_k is None:
        from upscale.recipe import lookup

        last_k = lookup(table, ("train", "train.stage2"), "last_k", 4)
        if type(last_k) is not int or last_k < 0:
            raise SamoeError(f"train.stage2.last_k = {last_k!r} must be an integer >= 0")
    report = plan_report(src_cfg, spec, check_dtype(dtype), last_k=last_k)
    if as_json:
        _print_json(report)
        return
    title = f"grown model: {report['total_params'] / 1e9:.3f}B parameters (source {report['source_params'] / 1e9:.3f}B)"
    console.print(_params_table(title, report["params_by_component"], f"[bold]{report['total_params']:,}[/]"))
    groups_ = next(iter(report["groups"].values()))
    per_token = (f"{report['top_k_groups']} replica group(s) x {report['routed_top_k']}" if report.get("replicas") else
                 f"{report['top_k']} core + {report['top_k_groups']} new group(s) x {report['routed_top_k']}")
    console.print(f"{report['num_moe_layers']} MoE layers, groups {groups_}, {report['num_blocks']} encoder blocks; "
                  f"experts per token in an encoder MoE layer: {per_token} (the source's: {report['top_k']})")
    flops = report["forward_flops"]
    ratio = flops["grown"] / flops["source"]
    console.print(f"forward pass per image: {flops['grown'] / 1e9:,.1f} GFLOP, the source's {flops['source'] / 1e9:,.1f} "
                  f"(x{ratio:.2f}); at equal compute, train the source about {ratio:.2f} steps per grown step "
                  "(stage 3; stages 1-2 skip the frozen parts' weight gradients)")
    m = Table(title=f"memory per stage ({dtype} weights/grads, SGD momentum; activations not included)")
    for col in ("stage", "trainable params", "weights", "grads", "optimizer", "total"):
        m.add_column(col, justify="right")
    for stage, v in report["memory_per_stage"].items():
        m.add_row(stage, f"{v['trainable_params']:,}", *(f"{v[k] / 2**30:.1f} GiB" for k in ("weights_bytes", "grad_bytes", "optimizer_bytes", "total_bytes")))
    console.print(m)


@app.command()
@handles_errors
def expand(
    source: Path = typer.Argument(..., help="Source (flat MoE) checkpoint."),
    out: Path = typer.Option(..., "--out", help="Grown checkpoint directory to create."),
    recipe: Optional[Path] = _recipe_option(),
    overrides: list[str] = _set_option(),
    experts: Optional[int] = typer.Option(None, "--experts", min=1, help=_EXPERTS_HELP),
    groups: Optional[str] = typer.Option(None, "--groups", help=_GROUPS_HELP),
    extra_blocks: Optional[int] = typer.Option(None, "--extra-blocks", min=0, help=_EXTRA_HELP),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the new experts' noise and pairs."),
    verify: Optional[Path] = typer.Option(None, "--verify", help="Data folder: compare source and grown outputs on its "
                                          "images (exit 3 above the recipe's verify_tol)."),
    device: str = typer.Option("auto", "--device", help="Where --verify runs both models (fp32): " + _DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a checkpoint samoe wrote at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (and verify report) as JSON."),
) -> None:
    """Grow a checkpoint: more experts in groups under a two-level router, extra identity blocks."""
    from dataclasses import asdict

    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from upscale.checkpoint import Checkpoint, parse_dtype
    from upscale.growth import grown_config
    from upscale.ownership import preflight_new_output

    settings, _ = _growth_settings(recipe, overrides, experts=experts, groups=groups, extra_blocks=extra_blocks)
    src = Checkpoint.open(source)  # opened once: growth, lineage digest and --verify all read these files
    spec = settings.spec(src.config.moe.num_experts, seed)
    grown_config(src.config, spec)  # a plan that cannot be grown, or a taken --out, is refused before torch is imported
    preflight_new_output(out, force)
    with _collector_off():
        from upscale.expand import expand_checkpoint
    out_dtype = parse_dtype(settings.dtype) if settings.dtype else None
    images = None
    if verify is not None:  # resolve the device, read the --verify images before writing anything: a bad one leaves no --out
        from upscale.device import resolve_device
        from upscale.ownership import check_separate
        from stages.data import load_images

        verify_device = resolve_device(device)
        check_separate(out, "--out", {"--verify": verify})
        from stages.dataspec import recorded
        from stages.units import resolve_units

        data_spec = recorded(src.meta, str(src.path / "samoe.json"))
        images = load_images(verify, src.config.img_size, settings.verify_images,
                             resolve_units(verify, recorded=data_spec and data_spec.units))
    gc.freeze()  # the collector's full passes would rescan torch's ~10^5 import-time objects all through the write
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=as_json) as progress, _one_job(out):
        task = progress.add_task("expanding", total=None)
        path = expand_checkpoint(
            src, out, spec, _command_line(), dtype=out_dtype, workers=settings.threads,
            shard_bytes=int(settings.shard_size_gib * 2**30), force=force, recipe=asdict(settings),
            on_start=lambda total: progress.update(task, total=total),
            on_tensor=lambda n: progress.advance(task, n),
        )
    report = None
    if verify is not None:
        from upscale.checkpoint import load_model
        from upscale.verify import output_deviation

        report = output_deviation(load_model(src, device=verify_device), load_model(path, device=verify_device), images)
    if as_json:
        from upscale.summary import inspect_checkpoint

        _print_json({"checkpoint": inspect_checkpoint(Checkpoint.open(path)), "verify": report})
    else:
        _show_summary(Checkpoint.open(path), False)
        if report:
            t = Table(title=f"--verify: grown vs source on {escape(str(verify))}")
            t.add_column("head")
            t.add_column("relative deviation", justify="right")
            t.add_column("relative max deviation", justify="right")
            for head, v in report.items():
                t.add_row(head, f"{v['relative']:.3e}", f"{v['relative_max']:.3e}")
            console.print(t)
    if report and settings.verify_tol is not None:
        worst = max(v["relative"] for v in report.values())
        if worst > settings.verify_tol:
            _fail(f"grown model deviates from the source by {worst:.3e} (> verify_tol {settings.verify_tol:g}); "
                  f"the checkpoint is kept at {path}", 3)


@app.command()
@handles_errors
def train(
    stage: int = typer.Option(..., "--stage", min=1, max=3, help="1 integration | 2 collaboration | 3 full fine-tune."),
    source: Path = typer.Option(..., "--from", help="Input checkpoint (expand output, or the previous stage's RUN/final)."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run directory (re-running the same command resumes)."),
    data: list[Path] = typer.Option(..., "--data", help="Labelled (images/ + masks/) or pseudo-labelled folder; repeat "
                                    "to train on several as one set (e.g. labelled data mixed into pseudo-labels)."),
    unlabelled: Optional[Path] = typer.Option(None, "--unlabelled", help="Unlabelled folder (images/) for the unsupervised phase."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Labelled folder scored (mIoU, whole scenes) while "
                                            "training: metrics.csv val_miou; RUN/best keeps the best step."),
    recipe: Optional[Path] = _recipe_option(),
    overrides: list[str] = _set_option(),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=SEED_MAX, help="Seed of data order, noise and "
                                       "augmentation (default: the recipe's, else 0)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP + " Under --nproc/torchrun each process takes GPU LOCAL_RANK."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes (GPUs) on this node: starts torchrun, shards the model with FSDP2."),
    force: bool = typer.Option(False, "--force", help="Start this run again: remove what samoe wrote in --run-dir."),
    skip_stage_check: bool = typer.Option(False, "--skip-stage-check", help="Train this stage from a checkpoint whose "
                                          "history lacks the stage before it (e.g. stage 2 straight after expand)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (progress goes to stderr)."),
) -> None:
    """Train one stage as a resumable job; RUN/final is the next stage's --from.

    Settings come from the recipe's [train] and [train.stageN] tables and --set (see recipes/); the resolved
    ones are recorded in the run and in the lineage of RUN/final. On CPU a resumed run is bit-identical to an
    uninterrupted one; on CUDA it agrees to float rounding.
    """
    from contextlib import nullcontext

    from stages.distributed import is_main_process
    from stages.engine import Interrupted, resume_command, run

    _check_train_device(nproc, device)
    cfg = _train_config(stage, recipe, overrides, dict(source=source, run_dir=run_dir, data=data, unlabelled=unlabelled,
                                                       val_data=val_data, device=device, seed=seed))
    display = _TrainDisplay(cfg.print_every, Console(stderr=True) if as_json else console)
    try:
        with _one_job(run_dir, "--run-dir") if is_main_process() else nullcontext():  # rank 0 holds it for all ranks
            final = run(cfg, force=force, check_stage=not skip_stage_check, on_start=display.on_start,
                        on_step=display.on_step, on_log=display.on_log)
    except Interrupted as e:
        display.stop()
        if is_main_process():
            sys.stderr.write(f"interrupted: saved {e.step_dir}; resume with: {resume_command(cfg.command)}\n")
        raise typer.Exit(128 + e.signum)
    finally:
        display.stop()
    if not is_main_process():
        return
    if as_json:
        from upscale.checkpoint import Checkpoint

        _print_json({"final": str(final), "run_dir": str(run_dir), "stage": Checkpoint.open(final).stages[-1]})
    else:
        console.print(f"done: {final} (next stage's --from)", markup=False)


def _check_train_device(nproc: int, device: str) -> None:
    """Fail on a missing device before anything is locked or written; with --nproc > 1, start torchrun and exit."""
    from stages.distributed import launch, world_size

    if nproc > 1 or world_size() > 1:
        from stages.distributed import process_device_kind

        process_device_kind(device)  # cpu or cuda: each process takes GPU LOCAL_RANK
    else:
        from upscale.device import resolve_device

        resolve_device(device)
    if nproc > 1 and world_size() == 1:  # not under torchrun yet: start it (it runs this same command)
        raise typer.Exit(launch(nproc, sys.argv[1:]))


def _train_config(stage: int, recipe_path: Optional[Path], overrides: list[str], given: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of `samoe train`: the defaults, the recipe's [train] then [train.stageN] tables, --set, and
    the options given on the command line (paths as strings), checked."""
    import os

    from stages.distributed import LAUNCH_COMMAND_ENV
    from stages.engine import RECIPE_SKIP, TrainConfig
    from upscale.device import check_precision
    from upscale.errors import SamoeError
    from upscale.recipe import load_recipe, resolve, unknown_tables

    where = str(recipe_path or "--set")
    table = load_recipe(recipe_path, overrides, f"train.stage{stage}")
    unknown_tables(table, ("growth", "train"), where)
    for name, value in table.get("train", {}).items():
        if isinstance(value, dict) and name not in ("stage1", "stage2", "stage3"):
            raise SamoeError(f"{where}: unknown table [train.{name}]; stage tables are [train.stage1] .. [train.stage3]")
    values = resolve(table, ("train", f"train.stage{stage}"), TrainConfig, where, skip=RECIPE_SKIP)
    values.update({k: v for k, v in given.items() if v is not None and k not in RECIPE_SKIP})
    if values["precision"] not in ("fp32", "bf16"):
        raise SamoeError(f"precision = {values['precision']!r} must be fp32 or bf16: fix the recipe or --set precision=...")
    values["precision"] = check_precision(values["precision"])
    _unit_options(values["input_scale"], values["dn_calibration"], values["polarisations"])
    if values["epochs"] is None and values["max_steps"] is None:
        values["epochs"] = values["timeline"]
    paths = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if k in RECIPE_SKIP}
    paths["data"] = [str(d) for d in given["data"]]
    launched = os.environ.get(LAUNCH_COMMAND_ENV)  # the command the user typed, when `--nproc` started torchrun
    command = json.loads(launched) if launched else _command_line()
    return TrainConfig(stage=stage, **paths, **values, command=command).check()


class _TrainDisplay:
    """What `samoe train` prints: the stage table when it starts, then a progress bar on a terminal or a plain
    line every `print_every` steps elsewhere (a batch job's log), validation results, the selector log."""

    def __init__(self, print_every: int = 10, to: Console = console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("stage {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("epoch {task.fields[epoch]} loss {task.fields[loss]} lr {task.fields[lr]} "
                                            "{task.fields[ips]} img/s"),
                                 TimeRemainingColumn(), console=to)
        self.console = to
        self.task: Any = None
        self.print_every = print_every
        self.plain = not to.is_terminal

    def on_start(self, info: dict) -> None:
        plan = info["stage"]
        t = Table(title=f"stage {plan.stage} ({plan.name}): {plan.description}; base lr {info['lr']:g}")
        for col in ("component", "trainable", "total", "lr"):
            t.add_column(col, justify="right")
        for comp, (tr, tot) in info["counts"].items():  # the learning rates the optimizers really use
            lrs = ", ".join(f"{lr:g}" for lr in info["lrs"].get(comp, []))
            t.add_row(comp, f"{tr:,}", f"{tot:,}", lrs if tr else "frozen")
        self.console.print(t)
        self.console.print("params: " + ", ".join(f"{k.capitalize()} {v:,}" for k, v in info["params"].items()))
        if info["resumed_from"]:
            self.console.print(f"resuming from {escape(info['resumed_from'])} (step {info['start_step']})")
        self.console.print(escape(f"data: {info['units']}; scenes as {info['scenes']}; classes "
                             f"{', '.join(info['classes']) if info['classes'] else 'not named (no classes.json)'}"
                             + (f"; validation on {info['validation']}" if info["validation"] else "")), soft_wrap=True)
        self.console.print(f"{info['epochs']} epochs x {info['steps_per_epoch']} steps = {info['total_steps']} steps")
        self.total = info["total_steps"]
        if self.plain:
            return
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"],
                                           stage=plan.stage, epoch=0, loss="-", lr="-", ips="-")

    def on_step(self, row: dict) -> None:
        if "val_miou" in row:
            best = " (best so far: RUN/best)" if row.get("best") else ""
            self.progress.console.print(f"step {row['step']}: validation mIoU {row['val_miou']:.4f}{best}")
        if self.plain:
            if row["step"] % self.print_every == 0 or row["step"] == self.total:
                self.console.print(f"step {row['step']}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} "
                              f"lr {row['lr']:.2e} {row['images_per_s']:.1f} img/s", soft_wrap=True)
            return
        self.progress.update(self.task, completed=row["step"], epoch=row["epoch"], loss=f"{row['loss']:.4f}",
                             lr=f"{row['lr']:.2e}", ips=f"{row['images_per_s']:.1f}")

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()

    def on_log(self, row: dict) -> None:
        self.progress.console.print(f"epoch {row['epoch']}: alpha {row['alpha']:.4f}  unsup_weight {row['unsup_weight']:.4f}  "
                                    f"selector mean {row['selector_mean']:.4f} std {row['selector_std']:.4f}")


@app.command("pseudo-label")
@handles_errors
def pseudo_label(
    checkpoint: Path = typer.Argument(..., help="Teacher checkpoint (e.g. the 1.5B source)."),
    images: Path = typer.Option(..., "--images", help="Unlabelled folder (images/)."),
    out: Path = typer.Option(..., "--out", help="Pseudo-label folder to create or complete."),
    threshold: float = typer.Option(0.0, "--threshold", min=0, max=1, callback=_finite, help="Pixels with confidence below this become ignore (255)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast for the teacher's forward)."),
    input_scale: Optional[str] = _scale_option(),
    dn_calibration: Optional[float] = _cal_option(),
    polarisations: Optional[str] = _pol_option(),
    overlap: Optional[float] = _overlap_option(),
    stride: Optional[int] = _stride_option(),
    tta: bool = typer.Option(False, "--tta", help="Average the teacher over the 8 rotations and flips of each image "
                             "(a better teacher, 8x the compute)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Label an unlabelled folder with a teacher checkpoint at the scenes' own resolution (resumable: labelled images
    are skipped). OUT gets the teacher's classes.json and the images' data.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from stages.pseudo import pseudo_label as run_pseudo
    from upscale.device import resolve_device

    torch_device, precision = resolve_device(device), _precision(precision)
    units = _unit_options(input_scale, dn_calibration, polarisations)

    with _one_job(out), Progress("pseudo-labelling", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=console, transient=as_json) as progress:
        task = progress.add_task("label", total=None)
        summary = run_pseudo(checkpoint, images, out, threshold, batch_size, device=torch_device, precision=precision,
                             on_start=lambda n, todo: progress.update(task, total=n, completed=n - todo),
                             on_image=lambda: progress.advance(task), unit_options=units, overlap=overlap, stride=stride,
                             tta=tta)
    if as_json:
        _print_json(summary)
    else:
        kept = summary["kept_fraction"]
        console.print(f"{out}: {summary['labelled']} labelled, {summary['skipped']} already done, "
                      f"{summary['ignored_pixels']:,} pixels below --threshold {threshold:g}"
                      + (f"; kept {kept:.1%} of the pixels labelled now" if kept is not None else ""), markup=False)


class _WorkProgress:
    """Progress of a long command: a rich bar on a terminal; elsewhere (a batch job's log) a plain line at the start
    and at every tenth of the work; nothing with --json (stdout holds the JSON)."""

    def __init__(self, label: str, as_json: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.label, self.quiet, self.plain = label, as_json, not console.is_terminal
        self.bar = Progress(label, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True)
        self.task: Any = None
        self.total, self.done, self.shown = 0, 0, -1

    def __enter__(self) -> "_WorkProgress":
        if not self.plain:
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.plain:
            self.bar.stop()

    def start(self, total: int) -> None:
        self.total = total
        if not self.plain:
            self.bar.update(self.task, total=total)
        elif total:
            self._line()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.plain:
            self.bar.advance(self.task, n)
        elif self.total and self.done * 10 // self.total > self.shown:
            self._line()

    def _line(self) -> None:
        self.shown = self.done * 10 // max(self.total, 1)
        if not self.quiet:
            console.print(f"{self.label}: {self.done}/{self.total}", markup=False, highlight=False)


@app.command("eval")
@handles_errors
def evaluate(
    checkpoints: list[Path] = typer.Argument(..., help="One or more checkpoints; the first is the baseline."),
    data: Path = typer.Option(..., "--data", help="Labelled folder (images/ + masks/), e.g. data/A-test."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=1, help="Bootstrap resamples for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Bootstrap seed."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write the figures here (expert usage, class -> group, "
                                         "new-group share, per-class IoU with CIs)."),
    report_dir: Optional[Path] = typer.Option(None, "--report", help="Write report.md (tables + embedded figures) here."),
    fmt: str = typer.Option("png", "--format", help="Figure format for --plots: png (200 dpi), svg or pdf."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --plots / --report folder that samoe wrote, replacing its figures."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast for the forward; metrics in fp32)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as one JSON object."),
    ablate_new: bool = typer.Option(True, "--ablate-new/--no-ablate-new",
                                    help="Score each grown checkpoint again with its new groups and extra blocks switched "
                                         "off, and show what they add (paired 95% CI): near 0 means the new capacity does "
                                         "no work and any gain over the source came from training its old parts further."),
    overlap: Optional[float] = _overlap_option(),
    stride: Optional[int] = _stride_option(),
    input_scale: Optional[str] = _scale_option(),
    dn_calibration: Optional[float] = _cal_option(),
    polarisations: Optional[str] = _pol_option(),
    compile_blocks: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
) -> None:
    """Compare checkpoints side by side on a labelled folder (whole scenes at native resolution), with routing statistics."""
    from stages.evaluate import METRICS, evaluate as run_eval, resolution_text, short_layer
    from stages.figures import check_format, check_output_dir
    from stages.report import NEW_PARTS_HEADER, layout_label, new_parts_rows, new_parts_verdict, write_eval_outputs

    from upscale.device import resolve_device

    check_format(fmt)
    torch_device, precision = resolve_device(device), _precision(precision)
    inputs = {"--data": data, **{f"checkpoint {c}": c for c in checkpoints}}
    for folder, option in ((plots, "--plots"), (report_dir, "--report")):
        if folder is not None:
            check_output_dir(folder, force, option, inputs)
    units = _unit_options(input_scale, dn_calibration, polarisations)
    with _WorkProgress("evaluating (windows)", as_json) as progress:
        report = run_eval(checkpoints, data, batch_size, bootstrap, seed, device=torch_device, precision=precision,
                          on_start=progress.start, on_batch=progress.advance, ablate_new=ablate_new,
                          overlap=overlap, stride=stride, unit_options=units, compile=compile_blocks)
    report.update(write_eval_outputs(report, plots, report_dir, fmt, force))
    if as_json:
        _print_json(report)
        return
    cks = report["checkpoints"]
    t = Table(title=escape(f"{report['data']}: {report['images']} images, {resolution_text(report)}"))
    t.add_column("metric")
    for i, ck in enumerate(cks):
        t.add_column(f"[{i}] {ck['total_params'] / 1e6:.2f}M", justify="right")
    for comp in report["comparisons"]:
        t.add_column("diff vs [0] (95% CI)", justify="right")
    for m in METRICS:
        row = [m] + [f"{ck['metrics'][m]:.4f}" for ck in cks]
        for comp in report["comparisons"]:
            d = comp["diff"][m]
            row.append(f"{d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})")
        t.add_row(*row)
    t.add_row("GFLOP / image", *[f"{ck['forward_flops'] / 1e9:,.3f}" for ck in cks],
              *[f"x{ck['forward_flops'] / cks[0]['forward_flops']:.2f}" for ck in cks[1:]])
    for cls in report["classes"]:
        t.add_row(escape(f"IoU {cls}"), *[("-" if ck["metrics"]["iou"][cls] is None else f"{ck['metrics']['iou'][cls]:.4f}") for ck in cks],
                  *["" for _ in report["comparisons"]])
    console.print(t)
    for i, ck in enumerate(cks):
        console.print(f"[{i}] {ck['path']} stages {ck['stages']}", soft_wrap=True, markup=False)
    for i, ck in enumerate(cks):
        if "new_parts_off" in ck:
            nt = Table(title=f"what the new parts of [{i}] add")
            for col in NEW_PARTS_HEADER:
                nt.add_column(col, justify="right")
            for row in new_parts_rows(ck):
                nt.add_row(*row)
            console.print(nt)
            console.print(new_parts_verdict(i, ck), soft_wrap=True, markup=False)
        if "regime" in ck:
            console.print(f"[{i}] {ck['regime']['line']}", soft_wrap=True, markup=False)
    for i, ck in enumerate(cks):
        r = Table(title=f"routing of [{i}] (groups {ck['groups']}, {layout_label(ck)})")
        for col in ("layer", "group share", "new (tokens)", "new (weight)", "dead", "load CV", "entropy"):
            r.add_column(col, justify="right")
        for name, v in ck["routing"].items():
            r.add_row(short_layer(name), " ".join(f"{x:.2f}" for x in v["group_share"]), f"{v['new_share']:.3f}",
                      f"{v['new_weight_share']:.3f}", str(v["dead_experts"]), f"{v['load_cv']:.2f}", f"{v['router_entropy']:.3f}")
        console.print(r)
    if plots is not None:
        console.print(f"plots: {', '.join(report['plots'])}", soft_wrap=True, markup=False)
    if report_dir is not None:
        console.print(f"report: {report['report']}", soft_wrap=True, markup=False)


@app.command()
@handles_errors
def predict(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to apply (e.g. runs/s3/final)."),
    images: list[Path] = typer.Option(..., "--images", help="A scene (.tif/.tiff/.png), or a folder of them (or a data "
                                      "folder with images/); repeat --images for more."),
    out: Path = typer.Option(..., "--out", help="Folder to create or complete: masks/, confidence/, previews/, predict.json."),
    overlap: Optional[float] = _overlap_option(),
    stride: Optional[int] = _stride_option(),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast for the forward)."),
    input_scale: Optional[str] = _scale_option(),
    dn_calibration: Optional[float] = _cal_option(),
    polarisations: Optional[str] = _pol_option(),
    force: bool = typer.Option(False, "--force", help="Replace an --out folder samoe predict wrote (other checkpoint or tiling)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
    compile_blocks: bool = typer.Option(False, "--compile", help=_COMPILE_HELP),
) -> None:
    """Segment whole scenes by sliding windows: a class mask and a confidence map per scene (GeoTIFF with the scene's
    CRS, transform and nodata), and a coloured preview with a legend. Resumes: scenes already done are skipped."""
    from stages.predict import PredictOptions, predict as run_predict
    from upscale.device import resolve_device

    torch_device, precision = resolve_device(device), _precision(precision)
    options = PredictOptions(overlap, stride, batch_size, torch_device, precision,
                             _unit_options(input_scale, dn_calibration, polarisations), force, compile_blocks)
    with _one_job(out), _WorkProgress("predicting (windows)", as_json) as progress:
        summary = run_predict(checkpoint, images, out, options, on_start=lambda n, skipped, w: progress.start(w),
                              on_windows=progress.advance)
    if as_json:
        _print_json(summary)
        return
    for name, scene in summary["scenes"].items():
        top = sorted(scene["class_fractions"].items(), key=lambda kv: -kv[1])[:3]
        console.print(escape(f"{name}: {scene['height']}x{scene['width']} px{', georeferenced' if scene['georeferenced'] else ''}"
                             f"; {', '.join(f'{k} {v:.1%}' for k, v in top)}; {scene['outputs']['masks']}"), soft_wrap=True)
    console.print(escape(f"{out}: {summary['predicted']} scene(s) predicted, {summary['skipped']} already done "
                         f"(windows of {summary['window']} px, stride {summary['stride']})"), soft_wrap=True)


@app.command("plot")
@handles_errors
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories (samoe train --run-dir); s1 s2 s3 in order are drawn end to end."),
    out: Path = typer.Option(..., "--out", help="Folder for the figures (losses, schedules, routing)."),
    fmt: str = typer.Option("png", "--format", help="png (200 dpi), svg or pdf."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out folder that samoe wrote, replacing its figures."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures written (path and caption) as JSON."),
) -> None:
    """Training curves of one or more runs from metrics.csv and selector_log.csv, stage boundaries marked."""
    from stages.curves import write_curves
    from stages.figures import check_format, check_output_dir

    check_format(fmt)
    check_output_dir(out, force, "--out", {f"run {r}": r for r in runs})
    written = write_curves(runs, out, fmt, force)
    if as_json:
        _print_json([{"path": str(w.path), "caption": w.caption} for w in written])
        return
    for w in written:
        console.print(f"{w.path}: {w.caption}", soft_wrap=True, markup=False)


def main() -> None:
    signal.signal(signal.SIGTERM, on_sigterm)  # clean up as on Ctrl-C (train saves a checkpoint in its own handler)
    try:
        app()
    except SystemExit as e:
        # a torchrun worker leaves without interpreter finalization once its process group is gone
        distributed = sys.modules.get("stages.distributed")
        if distributed is not None and distributed.closed_process_group():
            distributed.exit_worker(e.code)
        raise


if __name__ == "__main__":
    main()
