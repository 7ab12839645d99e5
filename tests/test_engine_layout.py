"""The engine is split by concern without import cycles (module-level imports, TYPE_CHECKING excluded)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ENGINE_PARTS = ["runtime", "pipeline", "session", "scheduler", "engine", "verifier"]


def _imports(mod: str, typing_too: bool = False) -> set[str]:
    """The nightlab modules ``mod`` imports at module level (not in functions; under TYPE_CHECKING too
    with ``typing_too``)."""
    path = SRC / "nightlab" / (mod.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC / "nightlab" / mod.replace(".", "/") / "__init__.py"
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for n in nodes:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test) and not typing_too:
                continue
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("nightlab"):
                base = n.module.removeprefix("nightlab").lstrip(".")
                for a in n.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    name = sub if (SRC / "nightlab" / (sub.replace(".", "/") + ".py")).exists() else base
                    if name:
                        out.add(name)
            elif isinstance(n, ast.Import):
                out.update(a.name.removeprefix("nightlab.") for a in n.names if a.name.startswith("nightlab."))
            elif isinstance(n, (ast.If, ast.Try)):
                visit(n.body)
                visit(n.orelse)

    visit(ast.parse(path.read_text()).body)
    return out


def _cycle_from(start: str, typing_too: bool = False) -> list[str] | None:
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        mod, path = stack.pop()
        for dep in _imports(mod, typing_too):
            if dep == start:
                return [*path, dep]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return None


@pytest.mark.parametrize("mod", ENGINE_PARTS)
def test_no_import_cycle_through_the_engine_parts(mod: str) -> None:
    assert _cycle_from(mod) is None, f"import cycle: {' -> '.join(_cycle_from(mod) or [])}"
    # not even for the type checker: the verifier sees the engine through a Protocol (verifier.Host)
    cycle = _cycle_from(mod, typing_too=True)
    assert cycle is None, f"import cycle (TYPE_CHECKING included): {' -> '.join(cycle or [])}"


def test_the_cycle_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check itself can fail: two modules importing each other are reported."""
    pkg = tmp_path / "nightlab"
    pkg.mkdir()
    (pkg / "a.py").write_text("from nightlab import b\n")
    (pkg / "b.py").write_text("from nightlab.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert _cycle_from("a") == ["a", "b", "a"]


@pytest.mark.parametrize("mod", ENGINE_PARTS)
def test_each_part_imports_alone(mod: str) -> None:
    """Each module loads first in a fresh interpreter (an import cycle would show as a partial module)."""
    subprocess.run([sys.executable, "-c", f"import nightlab.{mod}"], check=True)
