"""Every test module imports and collects here, the `gpu`-marked ones included (they run only on a GPU machine,
so a broken import in them would otherwise first show there), and every project import a test or helper makes,
at module level or inside a function, names a module and a name that exist."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = ("tests", "megatron_apo", "bench")


@pytest.mark.slow  # 12 s on 2 cores: it imports every test module
def test_the_whole_suite_collects():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " error" not in r.stdout.splitlines()[-1], r.stdout[-4000:] + r.stderr[-2000:]


def module_names(path: Path) -> set[str]:
    """The top-level names a module defines or imports (what `from module import name` can take)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):  # guarded imports and definitions
            names |= {(a.asname or a.name).split(".")[0] for n in ast.walk(node) if isinstance(n, ast.alias)
                      for a in [n]}
            names |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def module_path(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def bad_imports(path: Path) -> list[str]:
    bad = []
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith(OURS):
            target = module_path(node.module)
            if target is None:
                bad.append(f"{where}:{node.lineno}: no module {node.module}")
                continue
            defined = module_names(target)
            if "__getattr__" in defined:  # names made on first use (a lazy package): ask the module itself
                module = importlib.import_module(node.module)
                defined |= {a.name for a in node.names if hasattr(module, a.name)}
            for alias in node.names:
                submodule = module_path(f"{node.module}.{alias.name}")
                if alias.name != "*" and alias.name not in defined and submodule is None:
                    bad.append(f"{where}:{node.lineno}: {node.module} has no {alias.name}")
        elif isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno}: no module {a.name}" for a in node.names
                    if a.name.startswith(OURS) and module_path(a.name) is None]
    return bad


def test_every_project_import_in_the_tests_resolves():
    files = sorted(REPO.glob("tests/**/*.py")) + sorted(REPO.glob("bench/*.py"))
    assert len(files) > 40
    bad = [b for f in files for b in bad_imports(f)]
    assert bad == [], "\n".join(bad)


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def body():\n    from tests.test_vocab_parallel_ops import CASES\n"
                     "    from tests.distributed.test_vocab_parallel_ops import NOPE, CASES\n")
    assert bad_imports(probe) == ["probe.py:2: no module tests.test_vocab_parallel_ops",
                                  "probe.py:3: tests.distributed.test_vocab_parallel_ops has no NOPE"]
    assert importlib.util.find_spec("tests.distributed.test_vocab_parallel_ops") is not None
