"""Numba plumbing shared by every compiled module: one ``njit`` with the project's options,
the on-disk cache, the threading layer, and the threads serial kernels run in
(:func:`map_in_threads`, :func:`split_among_threads`).

The on-disk cache is used only where it can be written: next to the package, or in
``NUMBA_CACHE_DIR`` when the user sets it. A read-only install compiles without a cache
instead of failing.

Threading layer: numba's ``omp`` layer aborts a child forked after parallel code ran
("fork() called from a process already using GNU OpenMP"), and its ``workqueue`` layer
aborts when parallel code is called from several threads at once. Unless the user chose a
layer (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``), qsdlearn selects
``tbb``, which is safe under both, from the ``tbb`` package (a dependency where wheels exist);
without it, ``workqueue``, which is safe under fork, with :data:`KERNEL_LOCK` serialising
calls from several threads.
"""

import contextlib
import importlib.metadata
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
from threadpoolctl import ThreadpoolController


def cache_is_writable():
    """Whether numba's on-disk cache can be used (never on read-only installs)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    return os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)


_CACHE = cache_is_writable()


class _NoLock:
    """A context manager that does nothing, where the threading layer needs no lock."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


#: Whether this numba has its (private) option to compile a function without reference
#: counting, ``_nrt`` (numba 0.19 to 0.68 at least; see :func:`njit`).
_CAN_SKIP_REFCOUNTS = hasattr(numba.core.cpu.CPUTargetOptions, "_nrt")

#: The functions compiled without reference counting (``njit(refcounts=False)``), for the
#: test that none of them returns an array.
UNCOUNTED = []


def njit(refcounts=True, **options):
    """``numba.njit`` with the project's options: cached where possible, no GIL held.

    ``refcounts=False`` is for the per-row helpers of compiled kernels, which only borrow
    arrays that their compiled caller holds: numba counts the references to every array a
    function receives (an atomic increment and decrement, ``NRT_incref``/``NRT_decref``), and
    its pruning pass leaves most of those counts in place wherever a variable's life ends on
    several paths (a ``break``, ``and``/``or``, branches that use different arrays), which the
    row searches are full of: about 30 % of the code step's time. Such a helper is compiled
    with numba's ``_nrt=False`` (where this numba has it: :data:`_CAN_SKIP_REFCOUNTS`;
    otherwise with counting, the same results): numba then refuses to compile an array
    allocation in it, and it must not return an array (its caller would release a reference it
    was never given; ``tests/test_kernels.py`` checks the compiled signatures of
    :data:`UNCOUNTED`)."""
    if refcounts or not _CAN_SKIP_REFCOUNTS:
        return numba.njit(cache=_CACHE, nogil=True, **options)

    def compile_uncounted(function):
        dispatcher = numba.njit(cache=_CACHE, nogil=True, _nrt=False, **options)(function)
        UNCOUNTED.append(dispatcher)
        return dispatcher

    return compile_uncounted


#: Libraries of the ``tbb`` package numba's tbb layer links against, by platform.
_TBB_LIBRARIES = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")


def _load_tbb():
    """Load the ``tbb`` package's runtime so that numba's tbb layer finds it.

    pip installs ``libtbb`` into the environment's ``lib`` folder, which is not on the loader's
    search path; loading it by its full path first lets numba's extension link against it.
    Returns whether the tbb layer can be used.
    """
    import ctypes

    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for file in files:
        if file.name in _TBB_LIBRARIES:
            try:
                ctypes.CDLL(str(file.locate()), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                from numba.np.ufunc import tbbpool  # noqa: F401
            except (OSError, ImportError):
                return False
            return True
    return False


def choose_threading_layer():
    """Select the threading layer (see the module notes) unless the user chose one.

    Returns
    -------
    str
        The configured layer: the user's, ``"tbb"`` or ``"workqueue"``.
    """
    if os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER != "default":
        return numba.config.THREADING_LAYER
    numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "workqueue"
    return numba.config.THREADING_LAYER


THREADING_LAYER = choose_threading_layer()

#: Held around compiled calls when the layer cannot take concurrent calls from several
#: threads (``workqueue``); a no-op lock otherwise.
KERNEL_LOCK = threading.RLock() if THREADING_LAYER == "workqueue" else _NoLock()


_BLAS_CONTROLLER = None


def blas_single_thread():
    """A context in which BLAS runs on one thread: around compiled kernels that run in
    threads. The BLAS calls between them are small (k x k solves, thin products), and
    OpenBLAS's threads keep spinning for a while after each call, against the kernels'
    threads: on 2 cores that took a fifth of a fit's code step. threadpoolctl's controller is
    built once (building it inspects the loaded libraries, milliseconds), so that entering
    costs microseconds."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


@contextlib.contextmanager
def kernel_threads(n_threads=None):
    """Run compiled kernels on ``n_threads`` threads (all of numba's when ``None``), with
    BLAS on one thread (:func:`blas_single_thread`), so that kernel threads times BLAS
    threads never exceed the cores.

    numba's setting is per calling thread and is restored on exit; :data:`KERNEL_LOCK` is held
    meanwhile."""
    with KERNEL_LOCK, blas_single_thread():
        previous = numba.get_num_threads()
        wanted = numba.config.NUMBA_NUM_THREADS if n_threads is None else n_threads
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            numba.set_num_threads(previous)


_HELPERS = None


def _helpers():
    """The process's pool of helper threads, started on first use: one fewer than numba's
    largest thread count, since the calling thread works too. Shared by all calls, so that a
    call costs microseconds rather than the start of new threads (a quarter of a millisecond
    with two; a model's compression makes tens of thousands of calls)."""
    global _HELPERS
    if _HELPERS is None:
        _HELPERS = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                      thread_name_prefix="qsdlearn-kernel")
    return _HELPERS


def _forget_helpers():
    """In a forked child the pool's threads do not exist: start a new pool when needed."""
    global _HELPERS
    _HELPERS = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def map_in_threads(task, n_tasks):
    """``[task(0), ..., task(n_tasks - 1)]``, computed on numba's thread count of the calling
    thread (:func:`kernel_threads`): by the calling thread and helper threads of a pool kept
    for the process, each taking the next task not yet taken.

    For a ``task`` that calls a serial compiled kernel (which holds no GIL, see :func:`njit`)
    on its own chunk of rows: the threads then run in parallel, and the kernel compiles once,
    as itself. A ``parallel=True`` loop around the same kernel would have LLVM optimise it a
    second time, inlined into the loop, for every signature (for the code search, about half
    of the package's first-ever compilation). Results are in task order, whatever the number
    of threads; if tasks fail, the error of the first of them (in task order) is raised here
    once the tasks already running have finished, and the tasks not started are dropped.
    Helpers still queued behind another caller's work when the tasks run out are withdrawn,
    so calls from several threads never wait for each other's tasks."""
    n_threads = min(numba.get_num_threads(), n_tasks)
    if n_threads <= 1:
        return [task(t) for t in range(n_tasks)]
    results = done = [None] * n_tasks
    errors = {}
    taken = itertools.count()

    def work():
        while not errors:
            t = next(taken)  # atomic under the GIL
            if t >= n_tasks:
                return
            try:
                results[t] = task(t)
            except BaseException as error:  # raised again by the caller
                errors[t] = error

    helpers = []
    for _ in range(n_threads - 1):
        try:
            helpers.append(_helpers().submit(work))
        except RuntimeError:  # the interpreter is shutting down (atexit): the caller works alone
            break
    try:
        work()
    finally:
        errors.setdefault(n_tasks, None)  # stops the helpers taking further tasks
        for helper in helpers:
            if not helper.cancel():
                helper.result()
        # A withdrawn helper stays queued until a pool thread drops it: through the closure it
        # would keep the task's arrays alive meanwhile (a transient megabyte per layer).
        task = results = None
    del errors[n_tasks]
    if errors:
        raise errors[min(errors)]
    return done


def split_among_threads(kernel, m, *args):
    """``kernel(*args, start, stop)`` on one contiguous range of the ``m`` rows (or chunks) per
    thread: for kernels whose rows cost the same and whose results do not depend on the
    ranges, one call per thread instead of one per chunk (each call from Python costs tens of
    microseconds)."""
    parts = max(1, min(numba.get_num_threads(), m))
    bounds = [m * p // parts for p in range(parts + 1)]
    map_in_threads(lambda p: kernel(*args, bounds[p], bounds[p + 1]), parts)
