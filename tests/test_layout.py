"""The package's layering holds: dependencies run one way (ops <- losses <- data, modeling <- training <- stages <-
cli/demo), stages never import each other, no import cycle, and every module and function stays readable in size."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aam_fast"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# A layer may import its own and the layers below it.
LAYERS = ["ops", "losses", "data", "modeling", "training", "stages", "top"]
ALLOWED = {
    "ops": {"ops"},
    "losses": {"ops", "losses"},
    "data": {"ops", "losses", "data"},
    "modeling": {"ops", "losses", "data", "modeling"},
    "training": {"ops", "losses", "data", "modeling", "training"},
    "stages": {"ops", "losses", "data", "modeling", "training", "stages", "top"},
    "top": set(LAYERS),
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] in ("__init__", "__main__", "cli", "demo_assets"):
        return "top"
    return parts[1] if parts[1] in LAYERS else "top"


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            continue
        yield node
        yield from _runtime_nodes(node)


def imported(path: Path) -> set[str]:
    """The aam_fast modules ``path`` imports (relative imports resolved), at any depth of the file."""
    name = dotted(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("aam_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("aam_fast"):
                found.add(target)
    return found


def test_dependencies_run_one_way():
    wrong = []
    for path in modules():
        source = layer_of(dotted(path))
        for target in imported(path):
            if target != "aam_fast" and layer_of(target) not in ALLOWED[source]:
                wrong.append(f"{dotted(path)} ({source}) imports {target}")
            if target == "aam_fast" and source in ("ops", "losses", "data", "modeling", "training"):
                wrong.append(f"{dotted(path)} ({source}) imports the package root")
    assert not wrong, "\n".join(wrong)


def test_stages_do_not_import_each_other():
    wrong = []
    for path in modules():
        name = dotted(path)
        if name.startswith("aam_fast.stages."):
            stage = name.split(".")[2]
            for target in imported(path):
                parts = target.split(".")
                if target.startswith("aam_fast.stages.") and len(parts) > 2 and parts[2] != stage:
                    wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    names = {dotted(p): p for p in modules()}
    graph = {name: {t for t in imported(path) if t in names and t != name} for name, path in names.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                # a package's __init__ re-exporting its own modules is not a cycle between concerns
                if not (nxt == node.rsplit(".", 1)[0] or node.startswith(nxt + ".")):
                    pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            elif nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_kernel = any("jit" in ast.unparse(d) or "autotune" in ast.unparse(d) for d in node.decorator_list)
            length = node.end_lineno - node.lineno + 1
            assert is_kernel or length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"
