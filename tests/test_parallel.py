"""Threads and processes: numba's threading layer, fork after a fit, concurrent fits."""

import os
import platform
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor

import joblib
import numba
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition, _jit

from ._data import SETTINGS, fit_quietly, gaussian


def _run(script, env=None, timeout=180):
    """Run a Python script in a fresh interpreter; return the completed process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="the tbb package is a dependency on Linux x86_64 only")
def test_tbb_layer_is_selected_where_tbb_is_installed():
    assert _jit.THREADING_LAYER == "tbb"
    fit_quietly(QuantizedSparseDecomposition(4, n_nonzero=1, code_bits=0), gaussian(50, 4))
    import numba

    assert numba.threading_layer() == "tbb"


def test_a_layer_the_user_chose_is_kept():
    done = _run("""
        import numba
        numba.config.THREADING_LAYER = "workqueue"
        import qsdlearn._jit as jit
        print(jit.THREADING_LAYER, type(jit.KERNEL_LOCK).__name__)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["workqueue", "RLock"]


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_fork_pool_after_a_fit_in_the_parent():
    """A fit in the parent, then a fork pool whose workers fit too: no abort, no hang, and the
    children compute what the parent does."""
    done = _run("""
        import multiprocessing, warnings
        import numpy as np
        from qsdlearn import QuantizedSparseDecomposition
        warnings.simplefilter("ignore")
        X = np.random.default_rng(0).standard_normal((3000, 8))
        def fit(seed):
            est = QuantizedSparseDecomposition(16, n_nonzero=2, code_bits=2, max_iter=3,
                                               random_state=seed)
            return est.fit(X).reconstruction_err_
        if __name__ == "__main__":
            parent = [fit(0), fit(1)]
            with multiprocessing.get_context("fork").Pool(2) as pool:
                children = pool.map(fit, [0, 1])
            print(parent == children)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "OpenMP" not in done.stderr


@pytest.mark.parametrize("setting", ["qsd", "vq", "svd"])
def test_concurrent_fits_from_threads_equal_serial_fits(setting):
    X = gaussian(600, 6, seed=2)

    def fit(seed):
        est = QuantizedSparseDecomposition(random_state=seed, max_iter=5, **SETTINGS[setting])
        est = fit_quietly(est, X)
        return est.components_, est.encode(X).decode()

    serial = [fit(seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(fit, range(4)))
    for (c1, d1), (c2, d2) in zip(serial, concurrent):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(d1, d2)


def test_compress_weights_under_the_threading_backend_equals_serial():
    rng = np.random.default_rng(0)
    weights = {f"layer{i}.weight": rng.standard_normal((64, 48)).astype(np.float32)
               for i in range(3)}
    setting = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, 1, 0))
    serial = qsdlearn.compress_weights(weights, settings=setting, random_state=0, max_iter=3)
    with joblib.parallel_config(backend="threading"), warnings.catch_warnings():
        # warning filters are process-wide: a layer's filter may not cover another thread
        warnings.simplefilter("ignore", ConvergenceWarning)
        threaded = qsdlearn.compress_weights(weights, settings=setting, random_state=0,
                                             max_iter=3, n_jobs=3)
    assert threaded.to_bytes() == serial.to_bytes()
    assert [r["converged"] for r in threaded.report()] == [r["converged"] for r in serial.report()]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_map_in_threads_keeps_task_order_on_the_threads_asked_for(n_threads):
    import threading

    used = set()

    def task(t):
        used.add(threading.get_ident())
        return t * t

    with _jit.kernel_threads(n_threads):
        assert _jit.map_in_threads(task, 50) == [t * t for t in range(50)]
        assert _jit.map_in_threads(task, 0) == []
    assert 1 <= len(used) <= n_threads


def test_map_in_threads_raises_a_task_error_and_drops_the_tasks_not_started():
    import time

    done = []

    def task(t):
        if t == 0:
            raise ValueError("task 0 failed")
        time.sleep(0.001)
        done.append(t)

    with _jit.kernel_threads(2), pytest.raises(ValueError, match="task 0 failed"):
        _jit.map_in_threads(task, 2000)
    assert len(done) < 1999


def test_map_in_threads_raises_the_error_of_the_first_failing_task():
    def task(t):
        if t in (3, 7):
            raise ValueError(f"task {t} failed")
        return t

    with _jit.kernel_threads(2), pytest.raises(ValueError, match="task 3 failed"):
        _jit.map_in_threads(task, 10)


def test_map_in_threads_from_several_threads_at_once():
    """The helper pool is shared: callers in four threads each get their own results."""
    import threading

    results = {}

    def caller(c):
        with _jit.kernel_threads(2):
            results[c] = [_jit.map_in_threads(lambda t: (c, t), 200) for _ in range(20)]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    for c in range(4):
        assert results[c] == [[(c, t) for t in range(200)]] * 20


def _threads_used(n_tasks):
    """Threads that ran tasks of 2 ms each in one call on two threads."""
    import threading
    import time

    def task(t):
        time.sleep(0.002)
        return threading.get_ident()

    with _jit.kernel_threads(2):
        return len(set(_jit.map_in_threads(task, n_tasks)))


@pytest.mark.skipif(not hasattr(os, "fork") or numba.config.NUMBA_NUM_THREADS < 2,
                    reason="no fork on this platform, or numba has one thread here")
def test_map_in_threads_in_a_forked_child_after_the_parent_used_it():
    """The child starts its own helper threads (the parent's do not exist in it)."""
    import multiprocessing

    assert _threads_used(30) == 2
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_threads_used, (30,)).get(timeout=60) == 2


def test_a_fit_at_interpreter_exit():
    """The helper pool takes no work once the interpreter shuts down: an atexit handler's fit
    runs on the calling thread alone."""
    result = _run("""
        import atexit
        import numpy as np
        from qsdlearn import QuantizedSparseDecomposition

        def fit_at_exit():
            X = np.random.default_rng(0).standard_normal((3000, 8))
            est = QuantizedSparseDecomposition(n_components=16, n_nonzero=2, code_bits=2,
                                               codebook_bits=8, max_iter=3, random_state=0)
            print("codes", est.fit(X).transform(X).shape)

        atexit.register(fit_at_exit)
    """, env={"NUMBA_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    assert "codes (3000, 16)" in result.stdout
