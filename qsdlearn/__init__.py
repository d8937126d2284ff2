"""qsdlearn: sparse, quantized matrix factorizations ``X ~ Z C``, scikit-learn style."""

from ._estimator import QuantizedSparseDecomposition
from .codec import CompressedMatrix, load, save
from .metrics import sqnr
from .weights import CompressedModel, LayerSetting, compress_weights

__version__ = "0.1.0.dev0"

__all__ = [
    "CompressedMatrix",
    "CompressedModel",
    "LayerSetting",
    "compress_weights",
    "QuantizedSparseDecomposition",
    "load",
    "save",
    "sqnr",
    "__version__",
]
