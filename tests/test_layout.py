"""The package's shape holds: klein_core's layers import each other without a cycle (function-level imports too) and
klein_core never imports ComfyUI."""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "klein_core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every klein_core module that ``path`` imports, at any depth of its code (lazy imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("klein_core")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("klein_core"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names}  # `from ..model import lora`
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_klein_core_modules_import_each_other_without_a_cycle_even_lazily():
    graph = _graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_klein_core_imports_no_comfyui():
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            assert not any(n.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "folder_paths"} for n in names), (
                path
            )


MAX_FUNCTION_LINES = 80  # the house rule: a function reads on one screen
MAX_MODULE_LINES = 600
LIMITED = ("klein_core", "nodes")


def _limited_files() -> dict[str, Path]:
    """Every module the limits hold for, by its path from the repository root."""
    root = CORE.parent
    return {str(p.relative_to(root)): p for folder in LIMITED for p in sorted((root / folder).rglob("*.py"))}


def _long_functions(source: str, where: str, limit: int) -> list[str]:
    """``where:line name (N lines)`` of every function in ``source`` over ``limit`` lines, nested ones included."""
    return [
        f"{where}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_in_klein_core_or_nodes_is_longer_than_80_lines():
    offenders = [
        line
        for where, path in _limited_files().items()
        for line in _long_functions(path.read_text(), where, MAX_FUNCTION_LINES)
    ]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_module_in_klein_core_or_nodes_is_longer_than_600_lines():
    lengths = {where: len(path.read_text().splitlines()) for where, path in _limited_files().items()}
    offenders = [f"{where} ({n} lines)" for where, n in lengths.items() if n > MAX_MODULE_LINES]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_the_length_check_counts_nested_and_async_functions_from_def_to_last_line():
    source = (
        "def outer():\n"  # 1: outer spans lines 1-6 (6 lines)
        "    async def inner():\n"  # 2: inner spans lines 2-5 (4 lines)
        "        a = 1\n"
        "        b = 2\n"
        "        return a + b\n"
        "    return inner\n"
        "def short():\n"
        "    return 1\n"
    )
    assert _long_functions(source, "m.py", 4) == ["m.py:1 outer (6 lines)"]
    assert _long_functions(source, "m.py", 3) == ["m.py:1 outer (6 lines)", "m.py:2 inner (4 lines)"]
