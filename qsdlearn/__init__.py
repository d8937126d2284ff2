"""qsdlearn: sparse, quantized matrix factorizations ``X ~ Z C``, scikit-learn style."""

from ._estimator import QuantizedSparseDecomposition
from .metrics import sqnr

__version__ = "0.1.0.dev0"

__all__ = ["QuantizedSparseDecomposition", "sqnr", "__version__"]
