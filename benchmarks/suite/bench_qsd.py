"""asv benchmarks of qsdlearn: fit, transform, codec and the layer-wise adapter.

Every ``setup`` runs the same calls on a tiny input first, so numba's compilation (cached on
disk, but loaded per process) is not part of any timing. Expensive fits shared by several
benchmarks run once per class in ``setup_cache``; asv passes its result to ``setup`` and to every
benchmark as their first argument. ``track_*`` methods only read those cached fits and record
quality and size (SQNR in dB, bits per element, bytes), which asv plots across commits like
timings.
"""

import os
import tempfile
import warnings

import numpy as np

import qsdlearn
from qsdlearn import QuantizedSparseDecomposition, compress_weights, sqnr

#: Named settings (asv shows the names); rows of 8 elements.
SETTINGS = {
    "vq-k256": dict(n_components=256, n_nonzero=1, code_bits=0, codebook_bits=None),
    "qsd-k64-s2-2bit": dict(n_components=64, n_nonzero=2, code_bits=2, codebook_bits=8),
    "qsd-k256-s2-2bit": dict(n_components=256, n_nonzero=2, code_bits=2, codebook_bits=8),
    "dense-k8-4bit": dict(n_components=8, n_nonzero=None, code_bits=4, codebook_bits=8),
    "svd-k4": dict(n_components=4),
}


def gaussian_rows(n_rows, seed=0):
    return np.random.default_rng(seed).standard_normal((n_rows, 8)).astype(np.float32)


def fit(setting, X, max_iter=10):
    est = QuantizedSparseDecomposition(**SETTINGS[setting], max_iter=max_iter, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter is the budget
        return est.fit(X)


def warm(setting):
    """Compile (or load from numba's cache) every kernel the benchmarks of ``setting`` call."""
    X = gaussian_rows(1024, seed=1)
    est = fit(setting, X, max_iter=2)
    est.encode(X).decode()
    est.inverse_transform(est.transform(X))


class Fit:
    params = (list(SETTINGS), [20_000, 100_000])
    param_names = ["setting", "rows"]
    timeout = 600

    def setup_cache(self):
        """Fit every setting on every row count once: the quality of each fit."""
        quality = {}
        for setting in SETTINGS:
            for rows in self.params[1]:
                X = gaussian_rows(rows)
                est = fit(setting, X)
                quality[setting, rows] = dict(
                    sqnr_db=float(sqnr(X, est.inverse_transform(est.transform(X)))),
                    bits_per_element=float(est.bits_per_element_))
        return quality

    def setup(self, quality, setting, rows):
        warm(setting)
        self.X = gaussian_rows(rows)

    def time_fit(self, quality, setting, rows):
        fit(setting, self.X)

    def peakmem_fit(self, quality, setting, rows):
        fit(setting, self.X)

    def track_sqnr_db(self, quality, setting, rows):
        return quality[setting, rows]["sqnr_db"]

    track_sqnr_db.unit = "dB"

    def track_bits_per_element(self, quality, setting, rows):
        return quality[setting, rows]["bits_per_element"]

    track_bits_per_element.unit = "bits"


class Transform:
    """Encoding new rows against a fitted codebook (what ``transform`` and ``encode`` do)."""

    params = list(SETTINGS)
    param_names = ["setting"]
    timeout = 600

    def setup_cache(self):
        """One fitted estimator per setting (pickled by asv)."""
        return {setting: fit(setting, gaussian_rows(20_000)) for setting in SETTINGS}

    def setup(self, estimators, setting):
        warm(setting)
        self.est = estimators[setting]
        self.X = gaussian_rows(100_000, seed=2)

    def time_transform(self, estimators, setting):
        self.est.transform(self.X)

    def time_encode(self, estimators, setting):
        self.est.encode(self.X)


class Codec:
    """Decoding, and the file round trip, of a 4096 x 512 matrix (rows of 8)."""

    params = ["qsd-k64-s2-2bit", "qsd-k256-s2-2bit", "dense-k8-4bit"]
    param_names = ["setting"]
    timeout = 600

    def setup_cache(self):
        """Each setting fitted on 20,000 rows and the whole matrix encoded (pickled by asv)."""
        X = gaussian_rows(4096 * 512 // 8)
        return {setting: fit(setting, X[:20_000]).encode(X) for setting in self.params}

    def setup(self, encoded, setting):
        warm(setting)
        self.compressed = encoded[setting]
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "matrix.qsd")
        qsdlearn.save(self.compressed, self.path)

    def teardown(self, encoded, setting):
        self.dir.cleanup()

    def time_decode(self, encoded, setting):
        self.compressed.decode()

    def time_save(self, encoded, setting):
        qsdlearn.save(self.compressed, self.path)

    def time_load_decode(self, encoded, setting):
        qsdlearn.load(self.path).decode()

    def track_file_bytes(self, encoded, setting):
        return os.path.getsize(self.path)

    track_file_bytes.unit = "bytes"


class KMeansComparison:
    """The VQ setting next to scikit-learn's and faiss's k-means: 200,000 x 8 rows, 256
    codewords, 10 iterations from the same initial centroids."""

    params = ["qsdlearn", "sklearn", "faiss"]
    param_names = ["library"]
    timeout = 300

    def setup(self, library):
        if library == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise NotImplementedError("faiss-cpu is not installed")
        warm("vq-k256")
        self.X = gaussian_rows(200_000)
        self.init = self.X[np.random.default_rng(0).choice(len(self.X), 256, replace=False)]

    def time_kmeans(self, library):
        if library == "qsdlearn":
            est = QuantizedSparseDecomposition(**SETTINGS["vq-k256"], codebook_init=self.init,
                                               max_iter=10, tol=0.0, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.fit(self.X)
        elif library == "sklearn":
            from sklearn.cluster import KMeans

            KMeans(256, init=self.init, n_init=1, max_iter=10, tol=0.0).fit(self.X)
        else:
            import faiss

            km = faiss.Kmeans(8, 256, niter=10, max_points_per_centroid=len(self.X))
            km.train(self.X, init_centroids=self.init)


def small_model():
    rng = np.random.default_rng(0)
    return {
        "dense1": rng.standard_normal((256, 512)).astype(np.float32),
        "dense2": rng.standard_normal((512, 256)).astype(np.float32) * 0.5,
        "bias": rng.standard_normal(512).astype(np.float32),
    }


class CompressWeights:
    """The layer-wise adapter on a small synthetic model at 2 and 4 bits per weight."""

    params = [2.0, 4.0]
    param_names = ["bits_per_weight"]
    timeout = 600

    def setup_cache(self):
        """The whole-file bits per weight of each target, from one compression each."""
        return {bits: float(compress_weights(small_model(), bits_per_weight=bits,
                                             max_iter=10).bits_per_weight)
                for bits in self.params}

    def setup(self, model_bits, bits_per_weight):
        warm("qsd-k64-s2-2bit")
        self.weights = small_model()
        compress_weights({"w": self.weights["dense1"][:64]}, bits_per_weight=bits_per_weight,
                         max_iter=2)

    def time_compress_weights(self, model_bits, bits_per_weight):
        compress_weights(self.weights, bits_per_weight=bits_per_weight, max_iter=10)

    def track_model_bits_per_weight(self, model_bits, bits_per_weight):
        return model_bits[bits_per_weight]

    track_model_bits_per_weight.unit = "bits"
