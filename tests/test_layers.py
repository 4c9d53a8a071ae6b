"""The layers of docs/design.md, read off the source: who may import whom, and no private names.

1. kernels/ imports nothing of the project.
2. The format (compressed tensors, codecs, configs, sizes, checkpoint storage, the CPU
   stand-ins) imports no scheduler and nothing of the API layer.
3. scheduler/ imports no API, modules, training or checkpoint code.
4. No library module imports another module's private (underscore) names.
5. No library module is longer than ~600 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"neuzip_offload": "neuzip_offload", "kernels": "kernels", "scheduler": "scheduler"}

FORMAT = {
    "budget",
    "backend",
    "checkpoint",
    "codec",
    "compressed",
    "config",
    "conversion",
    "dtypes",
    "expert_layout",
    "sizing",
    "source",
    "storage",
    "streamcheck",
    "workers",
}
API = {
    "api",
    "autograd",
    "blocks",
    "bundled",
    "calibrate",
    "cli",
    "encode",
    "evaluate",
    "handle",
    "loading",
    "mixed",
    "model_analysis",
    "modules",
    "optim",
    "options",
    "planning",
    "save",
    "surgery",
    "training",
}
MAX_LINES = 600
# Modules allowed over MAX_LINES, each at most the length given (none since issue 9's split).
OVERSIZE: dict[str, int] = {}


def _files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).glob("*.py"))


def _module(path: Path) -> str:
    """Dotted name as installed: kernels/ans.py is neuzip_offload.kernels.ans."""
    folder = path.parent.name
    prefix = "neuzip_offload" if folder == "neuzip_offload" else f"neuzip_offload.{folder}"
    return prefix if path.stem == "__init__" else f"{prefix}.{path.stem}"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module imported, names taken from it) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.stem == "__init__" else _module(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            found.append((base, names))
            # `from . import x` imports the submodule x
            found += [(f"{base}.{n}", []) for n in names if not node.module]
    return found


def _layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("kernels", "scheduler"):
        return parts[1]
    if len(parts) >= 2 and parts[1] in FORMAT:
        return "format"
    if len(parts) >= 2 and parts[1] in API:
        return "api"
    return "package"


FORBIDDEN = {
    "kernels": {"format", "scheduler", "api", "package"},
    "format": {"scheduler", "api"},
    "scheduler": {"api"},
}
# Format modules a layer may still not import: the scheduler reads planes, never checkpoints.
FORBIDDEN_MODULES = {"scheduler": {"neuzip_offload.checkpoint"}}


def _layer_violations(path: Path) -> list[str]:
    me = _layer_of(_module(path))
    bad = []
    for name, _ in _imports(path):
        if not name.startswith("neuzip_offload") or name.startswith(_module(path)):
            continue
        if me == "kernels" and name.startswith("neuzip_offload.kernels"):
            continue
        other = _layer_of(name)
        if other in FORBIDDEN.get(me, set()):
            bad.append(f"{name} ({other})")
        elif any(name == m or name.startswith(f"{m}.") for m in FORBIDDEN_MODULES.get(me, ())):
            bad.append(f"{name} (checkpoint)")
    return bad


def _private_imports(path: Path) -> list[str]:
    return [
        f"{name}.{n}"
        for name, names in _imports(path)
        if name.startswith("neuzip_offload") and name != _module(path)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


@pytest.mark.parametrize("path", _files(), ids=_id)
def test_imports_follow_the_layers(path):
    bad = _layer_violations(path)
    assert not bad, f"{_id(path)} ({_layer_of(_module(path))} layer) imports {', '.join(bad)}"


@pytest.mark.parametrize("path", _files(), ids=_id)
def test_no_private_names_cross_modules(path):
    bad = _private_imports(path)
    assert not bad, f"{_id(path)} imports private names: {', '.join(bad)}"


def test_modules_stay_short():
    long = {}
    for path in _files():
        rel = str(path.relative_to(ROOT))
        lines = len(path.read_text().splitlines())
        if lines > OVERSIZE.get(rel, MAX_LINES):
            long[rel] = lines
    assert not long, f"modules over their limit ({MAX_LINES} lines, or OVERSIZE): {long}"


def test_the_rules_can_fail(tmp_path):
    """A scheduler file importing the API and a private name, a kernel importing the format."""
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "kernels").mkdir()
    sched = tmp_path / "scheduler" / "x.py"
    sched.write_text(
        "from neuzip_offload.api import dispatch\nfrom ..codec import _merge_range\n"
        "from ..checkpoint import Checkpoint\n"
    )
    kern = tmp_path / "kernels" / "y.py"
    kern.write_text("from ..compressed import Header\nfrom . import planes\n")
    assert _layer_violations(sched) == [
        "neuzip_offload.api (api)",
        "neuzip_offload.checkpoint (checkpoint)",
    ]
    assert _private_imports(sched) == ["neuzip_offload.codec._merge_range"]
    assert _layer_violations(kern) == ["neuzip_offload.compressed (format)"]


def test_tests_and_benchmarks_read_the_executor_through_its_public_api():
    """Executor.blocks(), tier_of(), device_buffers()... are the view; its fields stay its own."""
    import re

    private = re.compile(r"\b(?:ex|executor)\._[a-z]\w*")
    me = Path(__file__).resolve()
    found = [
        f"{p.relative_to(ROOT)}:{i}: {m.group(0)}"
        for folder in ("tests", "benchmarks", "examples")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p.resolve() != me
        for i, line in enumerate(p.read_text().splitlines(), 1)
        for m in private.finditer(line)
    ]
    assert not found, "\n".join(found)
