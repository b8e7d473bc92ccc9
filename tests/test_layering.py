"""The operator's import layering: no backend imports the state machine (status.py), which
takes only backends/base.py from them; the names both sides use live in leaf modules
(vocabulary.py, timefmt.py, backends/attempts.py). And no import cycle at all among the
module-level imports, so every module imports first in a fresh interpreter."""
from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "operator" / "alpaca_operator"
STATUS = "alpaca_operator.status"


def _name(path: Path) -> str:
    return ".".join(("alpaca_operator",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}
BACKENDS = sorted(m for m in MODULES if m.startswith("alpaca_operator.backends"))


def _imports(name: str, path: Path) -> set[str]:
    """The operator's modules `name` imports at module level (an import inside a function runs
    later, after every module has loaded), with the packages they load on the way; not the
    packages above `name`, which are loaded before it."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module or "") if x)
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            out |= {m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                    if m in MODULES and m != name and not name.startswith(m + ".")}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reach(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_no_import_cycle():
    order = list(graphlib.TopologicalSorter(GRAPH).static_order())    # raises CycleError
    assert STATUS in order and "alpaca_operator.backends.eks.backend" in order


def test_no_backend_reaches_the_state_machine():
    assert {m for m in BACKENDS if STATUS in _reach(m)} == set()
    assert {m for m in _reach(STATUS) if m.startswith("alpaca_operator.backends.")} == {"alpaca_operator.backends.base"}


def test_importing_every_backend_leaves_the_state_machine_unloaded():
    # The same, as Python sees it: nothing imported late or indirectly brings status.py in.
    code = f"import sys; import {', '.join(BACKENDS)}; print({STATUS!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
