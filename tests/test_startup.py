"""Commands that only read headers or count a layout start without torch.

Each case runs the CLI in a fresh interpreter, in process, and then lists which heavy modules
`sys.modules` holds: the check fails on the module, not on a timing of a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "segment_anything", "numpy")
RUN_CLI = f"""
import json, sys
sys.argv = ["samoe", *sys.argv[1:]]
import cli
try:
    cli.main()
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


def _loaded(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["code"] in (0, None), proc.stderr
    return result["loaded"]


@pytest.mark.parametrize("args", [
    ["--help"],
    ["expand", "--help"],
    ["plan", "--preset", "sam-moe-1.5b", "--experts", "117", "--groups", "8", "--extra-blocks", "1"],
    ["plan", "--preset", "tiny", "--experts", "16", "--groups", "4", "--set", "routed_top_k=1", "--json"],
], ids=["help", "expand-help", "plan-10b", "plan-json"])
def test_commands_that_count_import_no_torch(args: list[str]):
    assert _loaded(*args) == []


def test_inspect_reads_headers_without_torch(src: Path):
    assert _loaded("inspect-checkpoint", str(src)) == []
    assert _loaded("inspect-checkpoint", str(src), "--json") == []
    assert _loaded("plan", str(src), "--experts", "8", "--groups", "2") == []


@pytest.mark.slow  # 7 s: fresh interpreters importing torch
def test_the_model_imports_sam_modeling_without_torchvision():
    """upscale.model uses segment_anything.modeling without the package __init__ (predictor, torchvision);
    asking for the package's own names afterwards still gets the whole package."""
    code = """
import sys
import upscale.model
assert "torchvision" not in sys.modules and "segment_anything.predictor" not in sys.modules, "package __init__ ran"
from segment_anything import sam_model_registry, SamPredictor
import segment_anything.modeling.image_encoder as enc
assert upscale.model.ImageEncoderViT is enc.ImageEncoderViT
assert "torchvision" in sys.modules and callable(sam_model_registry["vit_b"])
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "ok", proc.stderr
