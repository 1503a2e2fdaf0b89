"""The shape of the code, kept by tests: which layer may import which, what the CLI loads, and the
name lists of the lazy packages.

Layers, bottom up: ``schemas`` (data shapes) < ``models`` (networks) < ``operators`` (stages) <
``jobs`` (commands). A layer imports nothing of the layers above it, wherever the import sits
(module top or inside a function: a lazy import is still a dependency). The storage layer never
imports model code: the one module of ``vbatch.models`` it uses, ``fileio`` (atomic local
writes, shared with the model-directory writers below it), must stay a leaf of the standard
library.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "models", "operators", "jobs")
#: what each layer may not import
FORBIDDEN = {
    "schemas": {"models", "operators", "jobs"},
    "models": {"operators", "jobs"},
    "operators": {"jobs"},
    "jobs": set(),
}
#: storage modules and the only vbatch.models module they may import (a stdlib-only leaf)
STORAGE = ("operators/storage.py", "operators/cache.py")
STORAGE_MAY_IMPORT = {"vbatch.models.fileio"}


def _modules() -> dict[str, Path]:
    return {
        str(p.relative_to(ROOT)): p
        for layer in LAYERS
        for p in sorted((ROOT / layer).rglob("*.py"))
    }


def _vbatch_imports(path: Path) -> set[str]:
    """Every ``vbatch.*`` module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vbatch.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("vbatch."):
                found.add(node.module)
    return found


def test_no_layer_imports_a_layer_above_it() -> None:
    problems = []
    for rel, path in _modules().items():
        layer = rel.split("/")[0]
        for module in sorted(_vbatch_imports(path)):
            if module.split(".")[1] in FORBIDDEN[layer]:
                problems.append(f"{rel} imports {module}")
    assert not problems, "\n".join(problems)


def test_storage_imports_no_model_code() -> None:
    problems = []
    for rel in STORAGE:
        for module in sorted(_vbatch_imports(ROOT / rel)):
            if module.startswith("vbatch.models") and module not in STORAGE_MAY_IMPORT:
                problems.append(f"{rel} imports {module}")
    assert not problems, "\n".join(problems)
    for module in STORAGE_MAY_IMPORT:
        leaf = ROOT / (module.removeprefix("vbatch.").replace(".", "/") + ".py")
        assert not _vbatch_imports(leaf), f"{module} must stay a standard-library leaf"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The import walk finds imports inside functions too (a lazy import is a dependency)."""
    code = "def f():\n    from vbatch.jobs.summary import RunClock\n    import vbatch.operators.x\n"
    (tmp_path / "m.py").write_text(code)
    assert _vbatch_imports(tmp_path / "m.py") == {"vbatch.jobs.summary", "vbatch.operators.x"}


def _lazy_lists(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(names imported under ``TYPE_CHECKING``, names of the ``lazy_exports`` map, ``__all__``)."""
    tree = ast.parse(path.read_text())
    typed: set[str] = set()
    lazy: set[str] = set()
    listed: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for sub in node.body:
                if isinstance(sub, ast.ImportFrom):
                    typed |= {a.asname or a.name for a in sub.names}
        elif isinstance(node, ast.Assign):
            target = ast.unparse(node.targets[0])
            if target == "__getattr__" and isinstance(node.value, ast.Call):
                mapping = node.value.args[1]
                assert isinstance(mapping, ast.Dict)
                for value in mapping.values:
                    lazy |= set(ast.literal_eval(value))
            elif target == "__all__":
                listed = set(ast.literal_eval(node.value))
    return typed, lazy, listed


LAZY_PACKAGES = sorted(
    str(p.relative_to(ROOT))
    for p in ROOT.glob("*/**/__init__.py")
    if "lazy_exports(" in p.read_text() and p.parts[-3] != "tests"
)


def test_lazy_packages_exist() -> None:
    assert "models/__init__.py" in LAZY_PACKAGES and len(LAZY_PACKAGES) >= 6


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_package_name_lists_agree(package: str) -> None:
    """A lazy package names each export three times (for type checkers, for the lazy import,
    for ``__all__``): the three lists must be the same set."""
    typed, lazy, listed = _lazy_lists(ROOT / package)
    assert typed == lazy == listed, {
        "only under TYPE_CHECKING": sorted(typed - lazy),
        "only in the lazy map": sorted(lazy - typed),
        "differs in __all__": sorted(listed ^ lazy),
    }


HEAVY = ("torch", "ray", "numpy", "pyarrow", "pandas", "PIL", "fsspec", "timm", "onnxruntime")


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )


def test_cli_help_imports_no_framework() -> None:
    """``vbatch --help`` (and every command's) answers without importing a framework."""
    code = f"""
import contextlib, io, sys
from vbatch.jobs.cli import build_parser
parser = build_parser()
commands = [[c] for c in ("segment", "video", "backfill", "report", "env", "demo")]
commands += [["reid", c] for c in ("embed", "index", "add", "search", "eval")]
commands += [["matting", "convert"], []]
for argv in commands:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            parser.parse_args([*argv, "--help"])
        except SystemExit:
            pass
    assert "usage: vbatch" in out.getvalue(), argv
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    assert _fresh(code).stdout.strip().splitlines()[-1] == "[]"


def test_report_and_env_import_no_torch(tmp_path: Path) -> None:
    """``vbatch report`` and ``vbatch env`` run in a process that never imports torch (env's
    framework probes run in a child interpreter)."""
    from tests.report_data import make_run
    from vbatch.operators.storage import Storage

    out, _ = make_run(Storage(), str(tmp_path), "salient", n=4)
    code = f"""
import sys
from vbatch.jobs.cli import main
assert main(["report", "--out", {out!r}, "--report-samples", "4"]) == 0
assert main(["env", "--json"]) == 0
print("torch" in sys.modules, "ray" in sys.modules)
"""
    result = _fresh(code)
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert '"torch"' in result.stdout  # env still reports torch, probed in its child


def test_readme_batch_defaults_are_the_entries() -> None:
    """The README's table of default batches is a copy of the registry's facts: kept equal."""
    import re

    from vbatch.models.registry import REGISTRY

    line = next(
        x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("| `--batch-size`")
    )
    stated = {
        name: (int(gpu), int(cpu))
        for name, gpu, cpu in re.findall(r"([a-z-]+) (\d+)(?: \(GPU\))? / (\d+)", line)
    }
    expected = {
        n: (e.batch_gpu, e.batch_cpu)
        for n, e in REGISTRY.items()
        if n in ("salient", "shop-seg", "reid", "matting")
    }
    assert stated == expected
