import numpy as np
import pytest

from qsdlearn import QuantizedSparseDecomposition

from ._data import SETTINGS, fit_quietly, gaussian


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def dtype(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def warm_kernels():
    """Compile (or load from numba's cache) every kernel for both dtypes once, up front, so
    that no single test pays for compilation."""
    for dt in (np.float64, np.float32):
        X = gaussian(40, 6).astype(dt)
        for params in SETTINGS.values():
            est = fit_quietly(QuantizedSparseDecomposition(max_iter=2, random_state=0, **params), X)
            est.encode(X).decode()
