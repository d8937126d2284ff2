"""The package's import graph, read from its source: no cycle, no upward import."""

import ast
import importlib
import pathlib
import textwrap

import pytest

from ._data import run_python

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qsdlearn"

#: Modules from the bottom up; a module may import only from layers below its own.
LAYERS = [
    {"_levels", "_params", "_checks"},
    {"_jit", "_container", "_allocation", "metrics", "_dtypes", "calibration", "_sampling"},
    {"_bits", "_kernels", "_seeding", "_checkpoint", "_calibration"},
    {"_constraints", "_metric"},
    {"_solver", "codec"},
    {"_estimator"},
    {"_layers"},
    {"_compressed_layers"},
    {"_model_headers", "_layer_fit"},
    {"_model", "_estimates"},
    {"_planning"},
    {"weights"},
    {"_demo", "_io"},
    {"cli"},
    {"__init__", "__main__"},
]
#: Modules that work on arrays and bytes only.
NO_SCIKIT_LEARN = {"_checks", "_jit", "_levels", "_container", "_allocation", "_bits", "_kernels",
                   "_dtypes", "_checkpoint", "_metric", "calibration", "_calibration",
                   "_sampling", "_seeding"}


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


def test_the_package_s_names_are_imported_on_first_use_as_declared():
    """``__init__`` names each public object twice, for static analysers (the ``TYPE_CHECKING``
    imports) and for its ``__getattr__`` (``_LAZY``): both must agree with ``__all__``."""
    import qsdlearn

    declared = {alias.name: f".{node.module}"
                for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text()))
                if isinstance(node, ast.ImportFrom) and node.level == 1 for alias in node.names}
    assert declared == qsdlearn._LAZY
    assert set(declared) | {"__version__"} == set(qsdlearn.__all__)
    for name, module in declared.items():
        assert getattr(qsdlearn, name) is getattr(importlib.import_module(module, "qsdlearn"), name)
    assert set(qsdlearn.__all__) <= set(dir(qsdlearn))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        qsdlearn.nothing


def test_the_package_lists_its_public_names_and_submodules():
    """``dir(qsdlearn)`` (what completion offers) in a fresh interpreter: the public names
    and submodules, not yet imported, and none of ``__init__``'s own helpers."""
    script = "import qsdlearn; print(' '.join(dir(qsdlearn)))"
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    names = set(result.stdout.split())
    public = {path.stem for path in PACKAGE.glob("*.py") if not path.stem.startswith("_")}
    assert {"compress_weights", "QuantizedSparseDecomposition", "__version__"} <= names
    assert public <= names and "weights" in public
    assert not names & {"importlib", "pkgutil", "TYPE_CHECKING", "_LAZY", "_kernels"}


def test_a_submodule_is_an_attribute_of_the_package_without_its_own_import():
    """As when ``__init__`` imported everything: ``import qsdlearn; qsdlearn.weights...``."""
    script = ("import sys, qsdlearn; assert 'qsdlearn.weights' not in sys.modules; "
              "print(qsdlearn.weights.MAX_DAMPING, qsdlearn._container.__name__)")
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1000000000000.0 qsdlearn._container\n"


def test_a_float32_fit_and_its_file_do_not_load_ml_dtypes(tmp_path):
    """ml_dtypes (bfloat16) takes most of a second to import: only bfloat16 tensors load it."""
    script = textwrap.dedent(f"""
        import sys, warnings
        import numpy as np
        import qsdlearn
        X = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # not converged in 2 iterations
            model = qsdlearn.QuantizedSparseDecomposition(n_components=4, max_iter=2).fit(X)
        qsdlearn.save(model.encode(X), {str(tmp_path / "x.qsd")!r})
        qsdlearn.load({str(tmp_path / "x.qsd")!r}).decode()
        print("ml_dtypes" in sys.modules)
    """)
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\n"
