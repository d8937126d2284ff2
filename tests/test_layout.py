"""The package's import graph, read from its source: no cycle, no upward import."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qsdlearn"

#: Modules from the bottom up; a module may import only from layers below its own.
LAYERS = [
    {"_levels"},
    {"_jit", "_container", "_allocation", "metrics", "_dtypes", "calibration", "_sampling"},
    {"_bits", "_kernels", "_checkpoint", "_calibration"},
    {"_constraints", "_metric"},
    {"_solver", "codec"},
    {"_estimator"},
    {"weights"},
    {"_demo", "_io"},
    {"cli"},
    {"__init__"},
]
#: Modules that work on arrays and bytes only.
NO_SCIKIT_LEARN = {"_jit", "_levels", "_container", "_allocation", "_bits", "_kernels",
                   "_dtypes", "_checkpoint", "_metric", "calibration", "_calibration",
                   "_sampling"}


def _imports(path):
    """Package modules and top-level libraries a module imports (lazy imports included)."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            internal.update([node.module.split(".")[0]] if node.module else
                            [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            external.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(alias.name.split(".")[0] for alias in node.names)
    return internal, external


GRAPH = {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set().union(*LAYERS)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_only(module):
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = {dep for dep in GRAPH[module][0] if level[dep] >= level[module]}
    assert not upward, f"{module} imports {sorted(upward)} from its own layer or above"


def test_no_cycle():
    """Depth-first search for a back edge (independent of the layer table above)."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in GRAPH[module][0]:
            if state.get(dep) == "open":
                pytest.fail(f"import cycle: {' -> '.join(path + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(NO_SCIKIT_LEARN))
def test_low_layers_do_not_import_scikit_learn(module):
    assert "sklearn" not in GRAPH[module][1]


def test_container_imports_nothing_from_the_package():
    assert GRAPH["_container"][0] == set()
