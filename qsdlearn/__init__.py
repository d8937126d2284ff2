"""qsdlearn: sparse, quantized matrix factorizations ``X ~ Z C``, scikit-learn style."""

from ._constraints import Constraints
from ._estimator import QuantizedSparseDecomposition
from ._io import load, save
from .calibration import GramAccumulator, metric_blocks
from .codec import CompressedMatrix
from .metrics import sqnr
from .weights import CompressedModel, LayerSetting, compress_weights

__version__ = "0.1.0.dev0"

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
