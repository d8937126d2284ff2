"""qsdlearn: sparse, quantized matrix factorizations ``X ~ Z C``, scikit-learn style.

The public names below are imported on first use (PEP 562), so that ``import qsdlearn`` and
the ``qsdlearn`` command start without loading numba, SciPy and scikit-learn.
"""

import importlib
import pkgutil
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

#: Public name -> the submodule that defines it.
_LAZY = {
    "Constraints": "._constraints",
    "QuantizedSparseDecomposition": "._estimator",
    "LayerSetting": "._layers",
    "CompressedModel": "._model",
    "load": "._io",
    "save": "._io",
    "GramAccumulator": ".calibration",
    "metric_blocks": ".calibration",
    "CompressedMatrix": ".codec",
    "sqnr": ".metrics",
    "compress_weights": ".weights",
}

if TYPE_CHECKING:  # what static analysers see; at run time, __getattr__ below
    from ._constraints import Constraints
    from ._estimator import QuantizedSparseDecomposition
    from ._io import load, save
    from ._layers import LayerSetting
    from ._model import CompressedModel
    from .calibration import GramAccumulator, metric_blocks
    from .codec import CompressedMatrix
    from .metrics import sqnr
    from .weights import compress_weights

__all__ = [
    "CompressedMatrix",
    "CompressedModel",
    "Constraints",
    "GramAccumulator",
    "LayerSetting",
    "compress_weights",
    "QuantizedSparseDecomposition",
    "load",
    "metric_blocks",
    "save",
    "sqnr",
    "__version__",
]


def __getattr__(name):
    """A public name or a submodule (``qsdlearn.weights``), imported on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later accesses skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # a submodule's own import failed: show it
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    """The public names and submodules (what completion offers), and the module's own
    dunder attributes."""
    submodules = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    dunders = {name for name in globals() if name.startswith("__")}
    return sorted(set(__all__) | submodules | dunders)
