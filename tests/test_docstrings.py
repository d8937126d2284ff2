"""numpydoc's validation of every public docstring, so that the API reference stays complete."""

import inspect

import pytest

numpydoc_validate = pytest.importorskip("numpydoc.validate")

import qsdlearn  # noqa: E402
import qsdlearn.codec  # noqa: E402
import qsdlearn.metrics  # noqa: E402
import qsdlearn.weights  # noqa: E402

#: Modules whose ``__all__`` is public API beyond the package's own.
MODULES = ("metrics", "weights", "codec")

#: Checked everywhere: parameters documented and known, returns described, layout.
CHECKS = {"GL02", "GL03", "PR01", "PR02", "PR03", "PR06", "PR07", "PR10", "RT03", "SA04", "SS01"}
#: Checked on functions, classes and methods (properties describe a value, not a call).
CALLABLE_CHECKS = {"RT01"}
#: Checked on public functions and classes, which must show an example.
TOP_LEVEL_CHECKS = {"EX01"}


def _public_names():
    top = [f"qsdlearn.{name}" for name in qsdlearn.__all__ if name != "__version__"]
    for module in MODULES:
        names = getattr(qsdlearn, module).__all__
        top += [f"qsdlearn.{module}.{name}" for name in names if name not in qsdlearn.__all__]
    members = []
    for name in top:
        obj = eval(name)  # noqa: S307 - names from __all__
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if not attr.startswith("_") and (callable(value) or isinstance(
                        value, (property, classmethod, staticmethod))):
                    members.append((f"{name}.{attr}", isinstance(value, property)))
    return [(name, "top", False) for name in sorted(set(top))] + [
        (name, "member", is_property) for name, is_property in members]


@pytest.mark.parametrize("name, level, is_property", _public_names(), ids=lambda v: str(v))
def test_docstring(name, level, is_property):
    checks = set(CHECKS)
    if not is_property:
        checks |= CALLABLE_CHECKS
    if level == "top":
        checks |= TOP_LEVEL_CHECKS
    errors = [f"{code}: {message}" for code, message in numpydoc_validate.validate(name)["errors"]
              if code in checks]
    assert not errors, "\n".join(errors)


def test_every_public_name_is_in_the_api_reference():
    import pathlib

    api = (pathlib.Path(__file__).resolve().parents[1] / "doc" / "api.rst").read_text()
    listed = {line.strip() for line in api.splitlines()}
    missing = [name for name in qsdlearn.__all__ if name != "__version__" and name not in listed]
    for module in MODULES:
        missing += [f"{module}.{name}" for name in getattr(qsdlearn, module).__all__
                    if f"{module}.{name}" not in listed and name not in listed]
    assert not missing, f"public names missing from doc/api.rst: {missing}"
