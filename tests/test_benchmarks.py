"""The rate–distortion benchmark's baselines count bits by the project's rules and compute what
they claim; its hull, frontier and tables pick the right points. Tiny inputs only."""

import json
import math
import warnings

import numpy as np
import pytest

from benchmarks import methods as M
from benchmarks import rate_distortion as RD
from qsdlearn import Constraints, QuantizedSparseDecomposition
from qsdlearn.weights import default_candidates
from qsdlearn._bits import support_bits
from qsdlearn._levels import quantize

BUDGET = M.FitBudget(fit_rows=512, max_iter=10, seed=0)


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)


def sq_error(a, b):
    return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_scalar_counts_bits_and_clips_near_optimally(weight, nbits):
    reconstruction, bits = M.scalar(nbits).run(weight, BUDGET)
    n, d = weight.shape
    assert bits == n * d * nbits + n * 32
    for rec in reconstruction:
        assert len(np.unique(rec)) <= 2**nbits
    # Brute force over 2000 clipping steps per row: the searched scales are within 1 % of it.
    W = weight.astype(np.float64)
    top = np.max(np.abs(W), axis=1, keepdims=True) / (2 ** (nbits - 1) - 0.5)
    best = np.min([np.sum((W - quantize(W, top * f, nbits)) ** 2, axis=1)
                   for f in np.linspace(0.01, 1.0, 2000)], axis=0)
    found = np.sum((W - reconstruction) ** 2, axis=1)
    assert np.all(found <= 1.01 * best + 1e-12)


def test_scalar_keeps_zero_rows_zero(weight):
    weight = weight.copy()
    weight[3] = 0
    reconstruction, _ = M.scalar(2).run(weight, BUDGET)
    assert np.all(reconstruction[3] == 0)


@pytest.mark.parametrize("factor_bits", [16, 8])
def test_svd_counts_bits_and_is_near_eckart_young(weight, factor_bits):
    n, d = weight.shape
    reconstruction, bits = M.svd(2.0, factor_bits).run(weight, BUDGET)
    rank = round(2.0 * n * d / ((n + d) * factor_bits))
    scales = 2 * rank * 32 if factor_bits == 8 else 0
    assert bits == rank * (n + d) * factor_bits + scales
    S = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    optimum = float(np.sum(S[rank:] ** 2))
    slack = 1e-4 if factor_bits == 16 else 2e-2
    assert optimum <= sq_error(weight, reconstruction) <= optimum * (1 + slack) + 1e-6


def test_svd_out_of_range_rank_is_not_applicable(weight):
    with pytest.raises(M.NotApplicable):
        M.svd(0.01, 16).run(weight, BUDGET)


def test_kmeans_on_single_values_is_a_scalar_quantizer(weight):
    reconstruction, bits = M.kmeans(1, 8).run(weight, BUDGET)
    assert bits == weight.size * 3 + 8 * 32
    assert len(np.unique(reconstruction)) <= 8
    # Lloyd–Max on Gaussian data at 3 bits: about 14.6 dB, far above 0.
    assert sq_error(weight, reconstruction) < 0.1 * sq_error(weight, 0 * weight)


def test_kmeans_counts_bits_and_uses_codewords(weight):
    reconstruction, bits = M.kmeans(4, 16).run(weight, BUDGET)
    rows = weight.size // 4
    assert bits == rows * 4 + 16 * 4 * 32
    assert len(np.unique(reconstruction.reshape(-1, 4), axis=0)) <= 16
    with pytest.raises(M.NotApplicable):
        M.kmeans(8, 1024).run(weight, BUDGET)
    with pytest.raises(M.NotApplicable, match="256 rows fitted < 300 codewords"):
        M.kmeans(4, 300).run(weight, M.FitBudget(fit_rows=256))  # 768 rows, 256 fitted


def test_fit_sample_is_every_row_or_a_draw_that_keeps_outlying_rows():
    rows = np.random.default_rng(0).standard_normal((4000, 2))
    rows[[17, 2500]] = 1e3
    sample, weights = M.FitBudget(fit_rows=None).sample(rows)
    assert sample is rows and weights is None
    sample, weights = M.FitBudget(fit_rows=200, seed=1).sample(rows)
    assert sample.shape == (200, 2)
    assert np.sum(np.all(sample == 1e3, axis=1)) == 2
    # Drawn rows weigh 1, each outlier stands for itself: the weights sum to 200 drawn rows'
    # worth of the 3998 others, plus the two outliers at 1 / factor each.
    factor = 3998 / 198
    np.testing.assert_allclose(np.sort(weights)[:2], 1 / factor)
    np.testing.assert_allclose(np.sort(weights)[2:], 1.0)
    # Without outliers, the plain uniform draw.
    plain = np.random.default_rng(0).standard_normal((4000, 2))
    sample, weights = M.FitBudget(fit_rows=200, seed=1).sample(plain)
    expected = np.sort(np.random.default_rng(1).choice(4000, 200, replace=False))
    assert weights is None
    np.testing.assert_array_equal(sample, plain[expected])


@pytest.mark.parametrize("method", [M.kmeans(2, 16), M.qsd(2, 16, 1, 0, None)])
def test_learned_baselines_fitted_on_a_sample_decode_its_outlying_rows(method):
    """A uniform draw of 256 of 8,000 rows would miss the two rows at 1000 and fit codewords
    to the others alone; the budget's sample holds them, weighted for themselves."""
    weight = np.random.default_rng(0).standard_normal((16, 1000)).astype(np.float32)
    weight[3, [10, 11, 500, 501]] = 1e3
    reconstruction, _ = method.run(weight, M.FitBudget(fit_rows=256, max_iter=10))
    np.testing.assert_allclose(reconstruction[3, [10, 11, 500, 501]], 1e3, rtol=0.01)


def test_qsd_bits_are_the_codecs_and_reconstruction_is_decode(weight):
    reconstruction, bits = M.qsd(8, 16, 2, 2, 8).run(weight, BUDGET)
    est = QuantizedSparseDecomposition(n_components=16, n_nonzero=2, code_bits=2,
                                       codebook_bits=8, max_iter=10, random_state=0)
    rows = weight.reshape(-1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        est.fit(rows)
    expected = est.encode(rows)
    assert bits == expected.bits
    np.testing.assert_array_equal(reconstruction, expected.decode().reshape(weight.shape))


def test_dictionary_omp_counts_bits_and_keeps_n_nonzero(weight):
    reconstruction, bits = M.dictionary_omp(16, 8, 2).run(weight, BUDGET)
    rows = weight.size // 16
    assert bits == rows * (support_bits(8, 2) + 2 * 32) + 8 * 16 * 32
    assert reconstruction.shape == weight.shape
    assert sq_error(weight, reconstruction) < sq_error(weight, 0 * weight)


def test_sparse_pca_counts_its_nonzeros(weight, monkeypatch):
    from sklearn import decomposition

    fitted = {}
    original = decomposition.SparsePCA.fit

    def spy(self, X, y=None):
        fitted["model"] = self
        return original(self, X, y)

    monkeypatch.setattr(decomposition.SparsePCA, "fit", spy)
    reconstruction, bits = M.sparse_pca(3, 1.0).run(weight, BUDGET)
    n, d = weight.shape
    nonzeros = (fitted["model"].components_ != 0).sum(axis=1)
    expected = n * 3 * 32 + d * 32 + sum(
        math.ceil(math.log2(d + 1)) + support_bits(d, int(t)) + int(t) * 32 for t in nonzeros)
    assert bits == expected
    assert reconstruction.shape == weight.shape


@pytest.mark.parametrize("kind", ["PQ", "RQ", "LSQ"])
def test_faiss_quantizers_count_bits(weight, kind):
    pytest.importorskip("faiss")
    reconstruction, bits = M.faiss_quantizer(kind, 8, 2, 4).run(weight, BUDGET)
    rows = weight.size // 8
    codebook = 16 * 8 if kind == "PQ" else 2 * 16 * 8
    assert bits == rows * 2 * 4 + codebook * 32
    assert sq_error(weight, reconstruction) < 0.9 * sq_error(weight, 0 * weight)


def test_faiss_rq_uses_a_beam_of_at_least_8(weight, monkeypatch):
    faiss = pytest.importorskip("faiss")
    assert M.RQ_BEAM_SIZE >= 8
    seen = {}
    original = faiss.ResidualQuantizer.train

    def spy(self, x):
        seen["beam"] = self.max_beam_size
        return original(self, x)

    monkeypatch.setattr(faiss.ResidualQuantizer, "train", spy)
    M.faiss_quantizer("RQ", 8, 2, 4).run(weight, BUDGET)
    assert seen["beam"] == M.RQ_BEAM_SIZE
    assert "beam 8" in M.faiss_quantizer("RQ", 8, 2, 4).setting


def test_row_scaled_qsd_counts_its_row_scales_and_fits_rows_of_any_scale():
    """The row-scaled QSD setting (compress_weights' own) costs the plain setting's payload
    plus 8 bits per row, and on rows whose scales span three decades it is the better one."""
    rng = np.random.default_rng(3)
    W = (10 ** rng.uniform(-2, 1, size=(64, 1)) * rng.standard_normal((64, 128))).astype(
        np.float32)
    plain, plain_bits = M.qsd(8, 16, 2, 1, 8).run(W, BUDGET)
    scaled, scaled_bits = M.qsd(8, 16, 2, 1, 8, row_scales=True).run(W, BUDGET)
    assert scaled_bits == plain_bits + 64 * 8
    assert scaled.shape == W.shape and scaled.dtype == W.dtype
    assert sq_error(W, scaled) < 0.7 * sq_error(W, plain)
    assert "row scales" in M.qsd(8, 16, 2, 1, 8, row_scales=True).setting
    with pytest.raises(M.NotApplicable):  # a tensor compress_weights keeps as it is
        M.qsd(8, 16, 2, 1, 8, row_scales=True).run(W[:4], BUDGET)


def test_method_grids_have_the_new_baselines():
    families = {m.family: m for m in M.method_grid("full", with_faiss=True)}
    assert {"faiss PQ", "faiss RQ", "faiss LSQ", "VQ (sklearn KMeans)"} <= set(families)
    sizes = {int(m.setting.split()[0][2:]) for m in M.method_grid("full", with_faiss=False)
             if m.family == "VQ (sklearn KMeans)"}
    assert sizes == {1, 2, 4, 8, 16}


@pytest.mark.parametrize("grid", ["quick", "model", "full"])
def test_qsd_grid_holds_the_vq_special_case_of_every_kmeans_baseline(grid):
    """Issue #10: QSD's hull can only lose to k-means through its grid, so every grid's QSD
    settings hold one-hot codes at each k-means (d, k), at no more bits by the same rules."""
    settings = M._GRIDS[grid]
    qsd = list(settings["qsd"])
    assert len(set(qsd)) == len(qsd), "a QSD setting is listed twice"
    assert settings["kmeans"]
    for d, k in settings["kmeans"]:
        vq = [s for s in qsd if s[:4] == (d, k, 1, 0)]
        assert vq, f"no QSD VQ setting (d={d}, k={k}, 1 nonzero, one-hot) in the {grid} grid"
        for n_rows in (1, 4096, 10**6):
            kmeans_bits = M.kmeans_bits(n_rows, d, k)
            # qsdlearn's own count of the setting, the one M.qsd reports (the codec's)
            vq_bits = min(Constraints(k, 1, 0, s[4]).bits(n_rows, d, 32).total for s in vq)
            assert vq_bits <= kmeans_bits
            if d > 1:  # the 8-bit codebook with a 32-bit scale per codeword is cheaper
                assert vq_bits < kmeans_bits


def test_model_kmeans_grid_holds_every_kmeans_candidate_of_compress_weights():
    """The adapter benchmark compares compress_weights with the model grid's baselines: their
    k-means grid is at least as dense as the planner's own k-means candidates."""
    planner = {(s.vector_size, s.constraints.n_components) for s in default_candidates(8)
               if s.constraints.one_hot and s.vector_size > 1}
    assert planner and planner <= set(M.KMEANS_GRID_MODEL)


def test_qsd_vq_setting_keeps_a_float_codebook_for_scalars_only():
    assert M.qsd_vq_setting(1, 16) == (1, 16, 1, 0, None)
    assert M.qsd_vq_setting(2, 256) == (2, 256, 1, 0, 8)
    assert M.qsd_vq_setting(16, 1024) == (16, 1024, 1, 0, 8)
    # At d = 1 the float codebook costs what k-means' does: 4-bit indices, 16 float32 levels.
    assert M.kmeans_bits(32, 1, 16) == 32 * 4 + 16 * 32
    assert Constraints(16, 1, 0, None).bits(32, 1, 32).total == M.kmeans_bits(32, 1, 16)
    # An 8-bit codebook there would cost 8 more bits per level (8 bits and a 32-bit scale).
    assert Constraints(16, 1, 0, 8).bits(32, 1, 32).total == M.kmeans_bits(32, 1, 16) + 16 * 8


def test_full_and_model_qsd_grids_have_dense_codes_of_2_to_5_bits():
    for grid in ("full", "model"):
        dense = {s[3] for s in M._GRIDS[grid]["qsd"] if s[:3] == (8, 8, None)}
        assert dense == {2, 3, 4, 5}


def _record(family, rate, value, dataset="gaussian", matrices=None):
    nmse = 10 ** (-value / 10)
    matrices = matrices or {"m": dict(bits=rate * 100, elements=100, error=nmse, signal=1.0)}
    return dict(dataset=dataset, family=family, setting=f"{rate}", bits=0, elements=1,
                bits_per_element=rate, sqnr_db=value, nmse=nmse, seconds=0.0, matrices=matrices)


def test_frontier_and_best_at_rates():
    records = [_record("A", 1.0, 5.0), _record("A", 2.0, 4.0), _record("A", 3.0, 9.0),
               _record("B", 0.4, 1.0)]
    front = RD.frontier([r for r in records if r["family"] == "A"])
    assert [r["bits_per_element"] for r in front] == [1.0, 3.0]
    table = RD.best_at_rates(records, targets=[0.5, 2.0, 3.0])
    assert table == {"A": [None, 5.0, 9.0], "B": [1.0, 1.0, 1.0]}


def test_evaluate_totals_over_matrices_and_skips_not_applicable():
    matrices = {"a": np.ones((2, 2), np.float32), "b": np.full((1, 2), 2.0, np.float32)}

    def half(weight, budget):
        return weight * 0.5, 3

    def refuse(weight, budget):
        raise M.NotApplicable("too small")

    records = RD.evaluate([M.Method("half", "x", half), M.Method("no", "y", refuse)],
                          matrices, BUDGET, "toy", log=lambda *_: None)
    assert len(records) == 1
    (r,) = records
    assert r["bits"] == 6 and r["elements"] == 6
    # signal 4 + 8 = 12, noise a quarter of it: 10 log10(4) dB
    assert r["sqnr_db"] == pytest.approx(10 * np.log10(4.0))
    assert r["nmse"] == pytest.approx(0.25)
    assert r["matrices"]["b"] == dict(bits=3, elements=2, error=2.0, signal=8.0)


def test_hull_table_reads_every_family_and_the_best_baseline():
    db = lambda nmse: -10 * np.log10(nmse)  # noqa: E731
    records = [_record("QSD", 2.0, db(0.25)), _record("A", 1.0, db(0.5)),
               _record("B", 4.0, db(0.01))]
    table = RD.hull_table(records, rates=[1.0, 2.0, 4.0])
    # QSD: (0, 1) to (2, 0.25); A: (0, 1) to (1, 0.5); B: (0, 1) to (4, 0.01).
    np.testing.assert_allclose(table["families"]["QSD"], [db(0.625), db(0.25), db(0.25)])
    np.testing.assert_allclose(table["best_baseline"], [db(0.5), db(0.5), db(0.01)])
    assert table["best_baseline_family"] == ["A", "A", "B"]
    np.testing.assert_allclose(table["qsd_minus_baseline"],
                               [db(0.625) - db(0.5), db(0.25) - db(0.5), db(0.25) - db(0.01)])


def test_pooled_and_per_matrix_hulls():
    def rec(family, m1, m2):  # (bits, error) on two matrices of 100 elements, signal 1 and 3
        matrices = {"x": dict(bits=m1[0], elements=100, error=m1[1], signal=1.0),
                    "y": dict(bits=m2[0], elements=100, error=m2[1], signal=3.0)}
        nmse = (m1[1] + m2[1]) / 4.0
        r = _record(family, (m1[0] + m2[0]) / 200, -10 * np.log10(nmse), matrices=matrices)
        return r

    records = [rec("QSD", (200, 0.1), (200, 2.0)), rec("VQ", (200, 0.5), (200, 0.3))]
    margins = RD.per_matrix_margins(records, rates=[2.0])
    assert margins["x"]["qsd_minus_baseline"][0] == pytest.approx(10 * np.log10(5))
    assert margins["y"]["qsd_minus_baseline"][0] == pytest.approx(-10 * np.log10(2.0 / 0.3))
    pooled = RD.hull_table(records, rates=[2.0])
    assert pooled["families"]["QSD"][0] == pytest.approx(-10 * np.log10(2.1 / 4))
    summary = RD.per_matrix_summary(margins)
    assert summary["wins"] == [1] and summary["n_matrices"] == 2


def test_write_report_makes_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    records = [_record("QSD", 1.0, 5.0), _record("QSD", 2.0, 10.0),
               _record("VQ", 1.0, 4.5), dict(_record("QSD", 2.0, 9.0, "digits"), accuracy=0.9),
               dict(_record("VQ", 1.0, 8.0, "digits"), accuracy=0.8)]
    speed = dict(
        kmeans=[dict(method="m", seconds=1.0, n_iter=20, seconds_per_iter=0.05, mse=0.3)],
        kmeans_rows=100, per_iteration=[dict(setting="s", n_rows=100, seconds_per_iter=0.1)],
        scaling=[dict(n_rows=10, seconds=0.1), dict(n_rows=100, seconds=1.0)],
        scaling_exponent=1.0, scaling_max_iter=5,
        peak_memory=dict(shape=[8, 8], rows=[8, 8], setting="s", max_iter=1, input_mib=1.0,
                         rss_before_fit_mib=10.0, peak_rss_mib=12.0, fit_seconds=0.1),
    )
    results = dict(quick=True, budget=BUDGET.__dict__, model_budget=BUDGET.__dict__,
                   records=records, date="2026-11-28",
                   machine="test", command="cmd", seconds=1.0, minilm_layers=None,
                   digits_float_accuracy=0.95, speed=speed)
    RD.write_report(results, str(tmp_path))
    for name in ("rate_distortion.md", "results.json", "gaussian_sqnr.png", "digits_sqnr.png",
                 "digits_accuracy.png", "fit_scaling.png", "qsd_margin.png"):
        assert (tmp_path / name).stat().st_size > 0
    text = (tmp_path / "rate_distortion.md").read_text()
    assert "| QSD | – | 5.00 | 5.00 | 10.00 | 10.00 | 10.00 | 10.00 | 10.00 |" in text  # buckets
    assert "| **QSD** | " in text and "| **QSD − best baseline** | " in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"] == records
    assert saved["hulls"]["gaussian"]["best_baseline_family"][0] == "VQ"


def test_reuse_takes_the_data_sets_not_run_from_an_earlier_run():
    earlier = dict(quick=False, budget=BUDGET.__dict__, model_budget=BUDGET.__dict__,
                   hull_rates=RD.HULL_RATES, date="2026-12-01", command="old",
                   datasets=["gaussian", "minilm"], gaussian_shape=[8, 8], minilm_layers=[0],
                   dataset_seconds=dict(gaussian=3.0, minilm=4.0),
                   records=[_record("QSD", 1.0, 5.0), _record("VQ", 1.0, 1.0, "minilm")])
    now = dict(quick=False, budget=BUDGET.__dict__, model_budget=BUDGET.__dict__,
               hull_rates=RD.HULL_RATES, date="2026-12-02", command="new",
               datasets=["minilm"], minilm_layers=[3],
               dataset_seconds=dict(minilm=5.0), records=[_record("VQ", 1.0, 2.0, "minilm")])
    RD.reuse_datasets(now, earlier)
    assert now["records"] == [_record("VQ", 1.0, 2.0, "minilm"), _record("QSD", 1.0, 5.0)]
    assert now["datasets"] == ["minilm", "gaussian"] and now["gaussian_shape"] == [8, 8]
    assert now["minilm_layers"] == [3] and now["dataset_seconds"] == dict(minilm=5.0)
    assert now["reused"] == dict(gaussian=dict(date="2026-12-01", command="old", seconds=3.0))
    later = dict(now, datasets=["digits"], records=[], reused={})
    RD.reuse_datasets(later, now)  # the Gaussian's source is still the run that made it
    assert later["reused"] == dict(gaussian=now["reused"]["gaussian"], minilm=dict(
        date=now["date"], command=now["command"], seconds=5.0))
    other = dict(now, budget=dict(BUDGET.__dict__, max_iter=99))
    with pytest.raises(ValueError, match="budget"):
        RD.reuse_datasets(other, earlier)
    skipped = dict(earlier, datasets=["gaussian", "minilm", "embeddings"])  # no weights there
    fresh = dict(now, datasets=["digits"], records=[], reused={})
    RD.reuse_datasets(fresh, skipped)
    assert sorted(fresh["reused"]) == ["gaussian", "minilm"]
    no_records = {key: value for key, value in earlier.items() if key != "records"}
    for broken in ([], {"date": "x"}, no_records):
        with pytest.raises(ValueError, match="not a results.json of this benchmark"):
            RD.check_reusable(now, broken)


def test_reuse_is_checked_before_the_run(tmp_path, monkeypatch):
    """A run whose budgets differ from the earlier run's stops before its first fit."""
    monkeypatch.setattr(RD, "evaluate", lambda *a, **k: pytest.fail("fitted"))
    earlier = dict(quick=False, budget={}, model_budget={}, hull_rates=RD.HULL_RATES,
                   date="d", command="c", datasets=[], dataset_seconds={}, records=[])
    with pytest.raises(ValueError, match="quick"):
        RD.run(True, str(tmp_path), with_speed=False, datasets=["gaussian"], reuse=earlier)


def test_model_fidelity_scores_and_rtn_count_what_they_claim():
    from benchmarks import model_fidelity as MF

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 4))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert MF.fidelity(reference, reference) == pytest.approx((1.0, 1.0))
    cosine, rho = MF.fidelity(reference, -reference)
    assert cosine == pytest.approx(-1.0) and rho == pytest.approx(1.0)  # same similarities
    weights = {"w": rng.standard_normal((40, 64)).astype(np.float32),
               "b": np.zeros(40, dtype=np.float32), "step": np.array(3)}
    quantized, bits_per_weight = MF.rtn_model(weights, 2)
    # 2 bits and a 32-bit scale per row of w; the float32 bias verbatim; integers not weights
    assert bits_per_weight == pytest.approx((40 * 64 * 2 + 40 * 32 + 40 * 32) / (40 * 64 + 40))
    assert all(len(np.unique(row)) <= 4 for row in quantized["w"])
    assert quantized["b"] is weights["b"]


def test_mlp_forward_collects_the_gram_of_each_layer_input():
    from benchmarks import model_fidelity as MF

    rng = np.random.default_rng(1)
    weights = {"fc1.weight": rng.standard_normal((5, 3)), "fc1.bias": np.zeros(5),
               "fc2.weight": rng.standard_normal((2, 5)), "fc2.bias": np.ones(2)}
    X = rng.standard_normal((7, 3))
    grams = {}
    logits = MF._mlp_forward(weights, X, grams)
    hidden = np.maximum(X @ weights["fc1.weight"].T, 0)
    np.testing.assert_allclose(logits, hidden @ weights["fc2.weight"].T + 1)
    np.testing.assert_allclose(grams["fc1.weight"].gram, X.T @ X)
    np.testing.assert_allclose(grams["fc2.weight"].gram, hidden.T @ hidden)


def test_mlp_summary_averages_seeds_and_counts_data_aware_wins():
    from benchmarks.model_fidelity import mlp_summary

    rows = {  # (method, target, bits, accuracy, logits error, seconds) per seed
        0: [("float32", 32.0, 32.0, 0.98, 0.0, None),
            ("QSD weight-only", 2.0, 2.0, 0.97, 0.08, 1.0),
            ("QSD data-aware", 2.0, 1.9, 0.96, 0.002, 3.0)],
        1: [("float32", 32.0, 32.0, 0.96, 0.0, None),
            ("QSD weight-only", 2.0, 1.8, 0.95, 0.06, 1.0),
            ("QSD data-aware", 2.0, 2.0, 0.95, 0.004, 3.0)],
    }
    summary = {row[:2]: row[2:] for row in mlp_summary(rows)}
    assert summary[("float32", 32.0)][:5] == pytest.approx((32.0, 0.97, 0.96, 0.98, 0.0))
    weight_only = summary[("QSD weight-only", 2.0)]
    assert weight_only[:5] == pytest.approx((1.9, 0.96, 0.95, 0.97, 0.07))
    assert weight_only[5] is None
    data_aware = summary[("QSD data-aware", 2.0)]
    assert data_aware[:5] == pytest.approx((1.95, 0.955, 0.95, 0.96, 0.003))
    assert data_aware[5] == "1/2"  # a tie counts: at least weight-only's accuracy


@pytest.mark.parametrize("argv, message", [
    (["--mlp-seeds", "-1"], "a seed is an int"),
    (["--mlp-seeds", "0", "0"], "repeats a seed"),
    (["--skip-mlp", "--skip-minilm"], "leave nothing to run"),
    (["--mlp-bits", "nan"], "must be positive and finite"),
    (["--bits", "0"], "must be positive and finite"),
    (["--minilm-methods", "foo"], "invalid choice"),
])
def test_model_fidelity_refuses_arguments_that_would_mislead(argv, message, tmp_path, capsys):
    from benchmarks.model_fidelity import main

    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_conv_checkpoint_has_mobilenet_v2_shapes(tmp_path):
    from benchmarks import speed_targets as ST
    from qsdlearn._checkpoint import open_checkpoint

    shapes = ST.mobilenet_v2_shapes()
    assert len(shapes) == 53  # 52 convolutions and the classifier
    assert shapes["features.2.depthwise.weight"] == (96, 1, 3, 3)
    path = tmp_path / "m.safetensors"
    n_weights = ST.write_conv_checkpoint(str(path))
    checkpoint = open_checkpoint(str(path))
    assert sum(math.prod(checkpoint.infos[n].shape) for n in checkpoint.names) == n_weights
    assert 3.4e6 < n_weights < 3.6e6


def test_speed_targets_table_flags_unmet_floors():
    from benchmarks import speed_targets as ST

    kmeans = [dict(method="qsdlearn VQ setting", seconds=1.0, mse=1.0),
              dict(method="sklearn KMeans (lloyd)", seconds=1.5, mse=1.0),
              dict(method="faiss Kmeans", seconds=1.0, mse=1.0)]
    result = dict(kmeans=kmeans,
                  per_iteration=[dict(setting="QSD x", seconds_per_iter=9.0),
                                 dict(setting="VQ x", seconds_per_iter=1.0)],
                  big_matrix=dict(shape=[64, 64], input_mib=1.0, seconds=1.0,
                                  peak_main_mib=100.0, peak_worker_mib=0.0),
                  conv_checkpoint=dict(n_layers=53, n_weights=3.5e6, weights_per_second=2e5),
                  scaling_exponent=1.0,
                  compilation=dict(cold_seconds=20.0, cold_cpu_seconds=19.0,
                                   warm_seconds=1.5, warm_cpu_seconds=1.4, uncompiled=[]))
    met = {line.split(" | ")[0].lstrip("| "): line.endswith("yes |")
           for line in ST.table(result).splitlines()[2:]}
    assert met["VQ setting / faiss.Kmeans, 20 iterations"]
    assert not met["VQ setting / sklearn KMeans(n_init=1), 20 iterations"]
    assert not met["one QSD iteration / one VQ iteration"]
    assert all(v for k, v in met.items() if "iteration" not in k and "sklearn" not in k)
    # a kernel the cold run left uncompiled is named, and the row is not met however fast
    result["compilation"]["uncompiled"] = ["qsdlearn._kernels.assign_one_slot"]
    rows = [line for line in ST.table(result).splitlines() if "empty cache" in line]
    assert len(rows) == 1 and "assign_one_slot" in rows[0] and rows[0].endswith("no |")


def test_per_iteration_takes_the_least_time_of_each_fit(monkeypatch):
    from benchmarks import speed

    class Fitted:
        def __init__(self, n_iter):
            self.n_iter_ = n_iter

    # scripted times, in call order: per repeat, QSD short/long then VQ short/long
    times = iter([5.0, 9.0, 1.0, 1.5,    # repeat 1
                  4.0, 9.5, 1.2, 1.3,    # repeat 2: the least QSD short, the least VQ long
                  4.5, 8.0, 0.9, 1.4])   # repeat 3: the least QSD long, the least VQ short
    calls = []

    def fake_fit(X, setting, max_iter, init, seed):
        calls.append((setting["n_nonzero"], max_iter))
        return Fitted(max_iter), next(times)

    monkeypatch.setattr(speed, "_fit", fake_fit)
    qsd, vq = speed.per_iteration(300, extra_iter=2, repeat=3)
    assert calls == [(2, 1), (2, 3), (1, 1), (1, 3)] * 3  # the settings in turn
    assert qsd["seconds_per_iter"] == pytest.approx((8.0 - 4.0) / 2)
    assert vq["seconds_per_iter"] == pytest.approx((1.3 - 0.9) / 2)
    assert qsd["seconds_short"] == [5.0, 4.0, 4.5] and vq["seconds_long"] == [1.5, 1.3, 1.4]
    assert qsd["seconds_one_iteration_fit"] == 4.0


def test_sensitivity_of_a_layer_that_is_the_model_is_one():
    from benchmarks.model_fidelity import relative_output_error, sensitivities

    rng = np.random.default_rng(0)
    A = rng.normal(size=(200, 12)) * np.linspace(0.1, 3, 12)  # inputs of unequal scales
    weights = {"w": rng.normal(size=(5, 12)), "v": rng.normal(size=(5, 12))}
    reference = A @ weights["w"].T

    def model_error(w):  # the relative output error of "w"; "v" does not matter
        return float(np.sum((A @ w["w"].T - reference) ** 2) / np.sum(reference**2))

    out = sensitivities(weights, ["w", "v"], {"w": A.T @ A}, model_error, damping=0.0)
    assert out["w"] == pytest.approx(1.0, rel=1e-9)
    # damped as compress_weights damps it, the relative error counts a weight error as well
    damped = sensitivities(weights, ["w"], {"w": A.T @ A}, model_error, damping=0.1)
    assert damped["w"] < out["w"]
    assert out["v"] == 0.0
    delta = rng.normal(size=(5, 12))
    counts = rng.integers(1, 5, size=5).astype(float)
    assert relative_output_error(delta, weights["w"], counts) == pytest.approx(
        np.sum(counts[:, None] * delta**2) / np.sum(counts[:, None] * weights["w"] ** 2))


def test_operating_point_sensitivity_measures_the_compression_error_itself():
    from benchmarks.model_fidelity import operating_point_sensitivities, relative_output_error

    rng = np.random.default_rng(1)
    A = rng.normal(size=(100, 6))
    weights = {"w": rng.normal(size=(4, 6)), "v": rng.normal(size=(4, 6)),
               "u": rng.normal(size=(4, 6))}
    # the model sees "w" through its first input only, and all of "v"
    mask = np.zeros(6)
    mask[0] = 1.0

    def model_error(w):
        return float(np.sum(((w["w"] - weights["w"]) * mask) ** 2)
                     + 2 * np.sum((w["v"] - weights["v"]) ** 2))

    def shifted(column):
        out = weights["w"].copy()
        out[:, column] += 0.5
        return out

    v_error = 0.1 * rng.normal(size=(4, 6))
    initial = {"w": 1.0, "v": 5.0, "u": 3.0}
    calibration = {"v": A.T @ A}
    hurts = operating_point_sensitivities(
        weights, {"w": shifted(0), "v": weights["v"] + v_error, "u": weights["u"]},
        calibration, model_error, initial)
    harmless = operating_point_sensitivities(
        weights, {"w": shifted(3), "v": weights["v"] + v_error, "u": weights["u"]},
        calibration, model_error, initial)
    # each tensor's error is measured with only that tensor compressed
    relative = 4 * 0.25 / np.sum(weights["w"] ** 2)  # the weight error over ||W||^2
    assert hurts["w"] == pytest.approx(4 * 0.25 / relative)
    assert harmless["w"] == 0.0
    # "v" has a Gram matrix: its relative error is measured in the damped output objective
    assert hurts["v"] == harmless["v"] == pytest.approx(
        2 * np.sum(v_error**2) / relative_output_error(v_error, weights["v"], A.T @ A))
    assert hurts["u"] == 3.0  # left exact: the initial value
