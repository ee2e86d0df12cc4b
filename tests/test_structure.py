"""The package's shape: no import cycles, the TVM backend apart from the stages, a light top level."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgevit"
# what backend modules may import besides each other: dependency-free shared modules
# edgevit.quantization is model code (the quantized layers the int8 encoding reads), not a stage
# the quantization records' math (int8; codebooks), which the weight encodings read: not stages
BACKEND_MAY_IMPORT = {"edgevit", "edgevit.errors", "edgevit.config", "edgevit.fileio", "edgevit.targets",
                      "edgevit.quantization", "edgevit.codebooks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edgevit_imports(path: Path) -> set[str]:
    """Every edgevit module `path` imports, at the top or inside functions (a lazy import still
    ties the modules together: it is how compile and tune came to import each other)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "edgevit"}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in edgevit_imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_anywhere_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_backend_never_imports_a_stage():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("edgevit.backend"):
            stray = {d for d in deps if not d.startswith("edgevit.backend") and d not in BACKEND_MAY_IMPORT}
            assert not stray, f"{name} imports {sorted(stray)}; the backend must not depend on stages"


def test_backend_init_imports_nothing_but_the_thread_count():
    """The backend's __init__ sizes TVM's thread pool before any backend module can start it,
    and imports nothing else; that module needs only the standard library."""
    def imports(path):
        tree = ast.parse(path.read_text())
        return [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]

    assert imports(PACKAGE / "backend" / "__init__.py") == ["edgevit.backend.threads"]
    assert set(imports(PACKAGE / "backend" / "threads.py")) <= {"__future__", "os", "pathlib"}


def test_reading_an_artifact_needs_no_torch_or_compiler():
    """verify and package read artifacts on devices that have only numpy and the TVM runtime."""
    code = ("import sys, edgevit.artifact, edgevit.verify, edgevit.package; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
