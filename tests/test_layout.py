"""The package's shape: no import cycles; models know nothing of mlflow or the tracking layer;
reports never import a model module."""

from __future__ import annotations

import ast
from pathlib import Path

ZOO = Path(__file__).resolve().parents[1] / "zoo"


def _imports() -> dict[str, set[str]]:
    """Module -> the modules it imports, at top level or inside functions. One exception: a
    function-level import of the module's own parent package (``zoo.kernels.triton``'s public
    wrappers call ``zoo.kernels`` at call time, by design)."""
    paths = sorted(ZOO.rglob("*.py"))

    def name_of(path: Path) -> str:
        return ".".join(path.relative_to(ZOO.parent).with_suffix("").parts).removesuffix(
            ".__init__"
        )

    modules = {name_of(p) for p in paths}
    graph = {}
    for path in paths:
        name = name_of(path)
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        deps = set()
        for node in ast.walk(tree):
            found = set()
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import submodule` depends on the submodule only
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                found = subs if len(subs) == len(node.names) else {node.module} | subs
            elif isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            if id(node) not in top_level:
                found = {d for d in found if not name.startswith(d + ".")}
            # importing a.b.c runs the packages a and a.b first (not the module's own parents)
            parents = {
                ".".join(d.split(".")[:i]) for d in found for i in range(1, d.count(".") + 1)
            }
            deps |= found | {
                p for p in parents & modules if not name.startswith(p + ".") and p != name
            }
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done, stack = set(), []

    def visit(mod: str) -> list[str] | None:
        if mod in stack:
            return stack[stack.index(mod) :] + [mod]
        if mod in done or mod not in graph:
            return None
        stack.append(mod)
        for dep in sorted(graph[mod] - {mod}):
            found = visit(dep)
            if found:
                return found
        stack.pop()
        done.add(mod)
        return None

    for mod in sorted(graph):
        found = visit(mod)
        if found:
            return found
    return None


def test_no_import_cycles():
    assert _cycle(_imports()) is None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_models_hold_no_tracking_code_and_reports_no_models():
    graph = _imports()
    for mod, deps in graph.items():
        if mod.startswith("zoo.models"):
            bad = {d for d in deps if d.split(".")[0] == "mlflow" or d.startswith("zoo.tracking")}
            bad |= {d for d in deps if d.startswith("lightning.pytorch.loggers")}
            assert not bad, f"{mod} imports {bad}"
        if mod.startswith("zoo.reports"):
            assert not {d for d in deps if d.startswith("zoo.models")}, mod


# Private attributes of other libraries' objects, each at its one commented seam (a subclass's
# own inherited attributes, ``self._x``, are its seam already). A new reach
# fails `test_private_reaches_stay_at_their_seams`: use the library's public API, or add a seam
# here with the reason no public way exists.
SEAMS = {
    # Lightning's accumulators of the running epoch; torchmetrics' update count
    ("zoo/faults.py", "_epoch_results", "_results"),
    ("zoo/faults.py", "_set_metric_state", "_update_count"),
    ("zoo/faults.py", "_set_metric_state", "_computed"),
    # torch tensors: a view's owner and its in-place version counter
    ("zoo/kernels/_tiles.py", "tile_map", "_base"),
    ("zoo/kernels/_tiles.py", "tile_map", "_version"),
}


def _private_reaches() -> set[tuple[str, str, str]]:
    """(file, enclosing function, attribute) for each ``x._name`` where ``x`` is not ``self``,
    ``cls``, a zoo module or name imported from one, or a private name of the file's own."""
    root = ZOO.parent
    paths = [*ZOO.rglob("*.py"), *(root / "hydra_plugins").rglob("*.py")]
    paths += [root / f for f in ("train.py", "evaluate.py", "predict.py")]
    found = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        ours = {"self", "cls"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("zoo", "hydra_plugins")
            ):
                ours |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                ours |= {a.asname or a.name.split(".")[0] for a in node.names if "zoo" in a.name}

        def visit(node, func, path=path, ours=ours):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = node.name
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                if owner not in ours and not owner.startswith("_"):
                    found.add((str(path.relative_to(root)), func, node.attr))
            for child in ast.iter_child_nodes(node):
                visit(child, func)

        visit(tree, "<module>")
    return found


def test_private_reaches_stay_at_their_seams():
    reaches = _private_reaches()
    assert reaches - SEAMS == set(), "a private attribute of another library's object"
    assert SEAMS - reaches == set(), "a seam that is gone: drop it from SEAMS"
