"""The package's layering holds: dependencies run one way (ops <- losses <- data, modeling <- training <- stages <-
cli/demo), stages never import each other, no import cycle, one training lifecycle (only training/ builds an
engine, resumes or saves), data read only in data/, and every module and function stays readable in size."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aam_fast"
MAX_MODULE_LINES = 450
MAX_OPS_MODULE_LINES = 600  # the kernels' modules (a kernel, its launcher and its tuning read best in one file)
MAX_FUNCTION_LINES = 80
# What only training/ does: build the engine, save and restore checkpoints; and the lifecycle's own methods, which a
# stage's trainer must not replace (it plugs into the lifecycle through its hooks).
LIFECYCLE_CALLS = {"build_engine", "save_checkpoint", "restore"}
LIFECYCLE_METHODS = {"run_to_end", "train", "_loop", "save_checkpoint", "_resume", "save_final"}
# The readers of records (files, folders, datasets): only data/ calls them.
READERS = {
    "load_preferences",
    "load_prompts",
    "read_records",
    "iter_source_records",
    "iter_file_records",
    "load_dataset",
    "load_from_disk",
}
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
            if target.startswith("aam_fast.testing"):
                wrong.append(f"{dotted(path)} imports the test fixtures (aam_fast.testing)")
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


def called_name(node: ast.Call) -> str | None:
    """The name a call calls: ``f`` of ``f(...)`` and of ``x.f(...)``."""
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def test_one_training_lifecycle():
    """Neither trainer builds an engine, resumes or saves on its own: outside training/ nothing calls
    build_engine, save_checkpoint or restore, and no class of a stage replaces the lifecycle's own methods."""
    wrong = []
    for path in modules():
        name = dotted(path)
        if name.startswith("aam_fast.training"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and called_name(node) in LIFECYCLE_CALLS:
                wrong.append(f"{name}:{node.lineno} calls {called_name(node)}")
            if isinstance(node, ast.ClassDef) and name.startswith("aam_fast.stages"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name in LIFECYCLE_METHODS:
                        wrong.append(f"{name}:{item.lineno} {node.name} defines {item.name}")
    assert not wrong, "\n".join(wrong)


def test_no_loader_outside_data():
    """Records are read only in data/ (the commands call its loaders): nothing outside it calls a reader."""
    wrong = []
    for path in modules():
        name = dotted(path)
        if name.startswith("aam_fast.data"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and called_name(node) in READERS:
                wrong.append(f"{name}:{node.lineno} calls {called_name(node)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_short(path):
    lines = path.read_text().splitlines()
    limit = MAX_OPS_MODULE_LINES if dotted(path).startswith("aam_fast.ops") else MAX_MODULE_LINES
    assert len(lines) <= limit, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            is_kernel = any("jit" in ast.unparse(d) or "autotune" in ast.unparse(d) for d in node.decorator_list)
            length = node.end_lineno - node.lineno + 1
            assert is_kernel or length <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {length} lines"
