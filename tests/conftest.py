import numpy as np
import pytest


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def dtype(request):
    return request.param


def sq_error(X, X_hat):
    X = np.asarray(X, dtype=np.float64)
    return float(np.sum((X - np.asarray(X_hat, dtype=np.float64)) ** 2))
